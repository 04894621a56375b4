# From datasets to model inputs: each step draws one dataset by sample ratio (as LAVIS's MultiIterLoader does),
# takes a batch of its Samples, opens the images and renders the prompts. Deterministic by (seed, step), resumable.
# Data path: dataset files -> readers -> Sample -> [this] -> Batch -> model.
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from tinygptv.data.datasets.sample import DatasetError, Sample
from tinygptv.data.image_file import ImageError
from tinygptv.data.image_processor import ImageProcessor
from tinygptv.data.templates import Template


@dataclass
class Batch:
    pixel_values: torch.Tensor | None  # [n_images, 3, S, S]: only the samples that have an image
    has_image: list[bool]
    prompts: list[str]
    answers: list[list[tuple[str, bool]]]  # (text, supervised) segments per sample
    sources: list[str]
    dataset: str = ""
    image_keys: list[str | None] = field(default_factory=list)  # file path of each sample's image, if it has one
    any_image: bool = False  # some sample of the global batch (every process's share, not just this one) has an image

    def __len__(self) -> int:
        return len(self.prompts)


class PromptRenderer:
    """Renders a Sample the way the official training does: the first instruction, with the image
    markup, wrapped in the template; answers closed by end_sym; each follow-up question preceded by the EOS text
    and left unsupervised. A caption-only sample (instruction None) is just the image."""

    def __init__(self, template: Template, end_sym: str, image_prompt: str, eos_text: str,
                 instruction_suffix: str = ""):
        self.template, self.end_sym, self.image_prompt, self.eos_text = template, end_sym, image_prompt, eos_text
        self.suffix = instruction_suffix

    def __call__(self, sample: Sample, has_image: bool) -> tuple[str, list[tuple[str, bool]]]:
        (first_q, first_a), rest = sample.turns[0], sample.turns[1:]
        if first_q is None:
            prompt = "<ImageHere>" if has_image else ""
        else:
            # the official stage-4 readers end image instructions and follow-up questions with a space, not
            # text-only ones: instruction_suffix reproduces that where a recipe asks for it
            text = self.image_prompt.format(first_q + self.suffix) if has_image else first_q
            prompt = self.template.turn.format(text)
        segments = [(first_a + self.end_sym, True)]
        for question, answer in rest:
            segments.append((self.eos_text + self.template.turn.format(question + self.suffix), False))
            segments.append((answer + self.end_sym, True))
        return prompt, segments


@dataclass
class StreamState:
    """Everything needed to continue the data exactly where a checkpoint stopped."""

    step: int = 0
    cursors: dict[str, int] = field(default_factory=dict)  # samples consumed in the current pass of each dataset
    epochs: dict[str, int] = field(default_factory=dict)  # full passes completed over each dataset
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)  # bad records skipped: dataset -> reason -> n


class MixedBatches:
    """One dataset per step, chosen with probability sample_ratio / sum of ratios; batches of that dataset's
    batch size; each pass over a dataset in a fresh seeded order (drop_last). Under DDP every rank draws the same
    dataset and global batch and keeps its own slice, so one process and N processes see the same samples.

    skip_bad (the recipe's on_bad_record: skip) decides for every kind of bad record: the malformed ones the readers
    set aside while parsing (stop: the first stops the run before it starts), the ones a shard reader meets while
    streaming, and records whose image is missing or cannot be decoded. Skipped records are counted per dataset and
    reason in state.skipped."""

    def __init__(self, datasets: dict[str, Any], ratios: dict[str, float], batch_sizes: dict[str, int],
                 processor: ImageProcessor, renderer: PromptRenderer, *, seed: int, skip_bad: bool,
                 rank: int = 0, world_size: int = 1):
        self.datasets, self.ratios, self.batch_sizes = datasets, ratios, batch_sizes
        self.processor, self.renderer = processor, renderer
        self.seed, self.skip_bad, self.rank, self.world_size = seed, skip_bad, rank, world_size
        self.names = list(datasets)
        self.state = StreamState()
        self._orders: dict[tuple[str, int], list[int]] = {}
        self._iters: dict[str, Any] = {}
        for name, ds in datasets.items():
            self._set_aside(name, ds)
            if hasattr(ds, "__len__") and len(ds) < batch_sizes[name]:
                raise DatasetError(f"dataset {name!r} has {len(ds)} usable records, fewer than its batch size "
                                   f"{batch_sizes[name]}")
            if batch_sizes[name] % world_size:
                raise ValueError(f"dataset {name!r}: batch size {batch_sizes[name]} does not split over "
                                 f"{world_size} processes")

    def _set_aside(self, name: str, ds) -> None:
        """The records the reader could not parse: stop at the first, or count them; a streaming reader is told to
        skip its own bad samples (they are counted as they go by, in _next_streamed)."""
        bad = getattr(ds, "bad_records", [])
        if bad and not self.skip_bad:
            more = f" ({len(bad) - 1} more malformed records)" if len(bad) > 1 else ""
            raise DatasetError(f"dataset {name!r}: {bad[0]}{more}; fix the file, or set on_bad_record: skip to "
                               "leave such records out") from bad[0]
        for error in bad:
            self._count_skip(name, error.reason)
        if self.skip_bad and hasattr(ds, "strict"):
            ds.strict = False

    def _count_skip(self, name: str, reason: str, n: int = 1) -> None:
        reasons = self.state.skipped.setdefault(name, {})
        reasons[reason] = reasons.get(reason, 0) + n

    def _order(self, name: str) -> list[int]:
        epoch = self.state.epochs.get(name, 0)
        key = (name, epoch)
        if key not in self._orders:
            order = list(range(len(self.datasets[name])))
            random.Random(f"{self.seed}:{name}:{epoch}").shuffle(order)
            self._orders = {k: v for k, v in self._orders.items() if k[0] != name}
            self._orders[key] = order
            if hasattr(self.datasets[name], "set_epoch"):
                self.datasets[name].set_epoch(epoch)
        return self._orders[key]

    def _next_pass(self, name: str) -> None:
        self.state.epochs[name] = self.state.epochs.get(name, 0) + 1
        self.state.cursors[name] = 0

    def choose(self, step: int) -> str:
        rng = random.Random(f"{self.seed}:choose:{step}")
        return rng.choices(self.names, weights=[self.ratios[n] for n in self.names])[0]

    def _streamed(self, name: str) -> bool:
        return not hasattr(self.datasets[name], "__len__")

    def _next_streamed(self, name: str) -> tuple[int, Sample]:
        """Webdataset shards have no length: read on, and start the next pass (set_epoch) when one ends. After a
        resume the current pass is re-read up to the saved cursor."""
        ds = self.datasets[name]
        while True:
            if name not in self._iters:
                ds.set_epoch(self.state.epochs.get(name, 0))
                self._iters[name] = iter(ds)
                for _ in range(self.state.cursors.get(name, 0)):
                    next(self._iters[name])
            skipped_before = getattr(ds, "skipped", 0)
            try:
                sample = next(self._iters[name])
            except StopIteration:
                del self._iters[name]
                self._next_pass(name)
                continue
            except DatasetError as e:  # a shard reader's bad sample, with on_bad_record: stop
                raise DatasetError(f"dataset {name!r}: {e}", e.reason) from e
            finally:
                if getattr(ds, "skipped", 0) > skipped_before:
                    self._count_skip(name, "malformed record", ds.skipped - skipped_before)
            cursor = self.state.cursors.get(name, 0)
            self.state.cursors[name] = cursor + 1
            return cursor, sample

    def _next_indexed(self, name: str) -> tuple[int, None]:
        order, cursor = self._order(name), self.state.cursors.get(name, 0)
        if cursor >= len(order):  # only reachable when bad records were skipped
            self._next_pass(name)
            order, cursor = self._order(name), 0
        self.state.cursors[name] = cursor + 1
        return order[cursor], None

    def next_batch(self) -> Batch:
        name = self.choose(self.state.step)
        self.state.step += 1
        size = self.batch_sizes[name]
        streamed = self._streamed(name)
        if not streamed and len(self._order(name)) - self.state.cursors.get(name, 0) < size:
            self._next_pass(name)  # drop_last: a batch does not mix the end of one pass with the next
        samples: list[tuple[int, Sample, Any]] = []
        bad = 0
        while len(samples) < size:
            index, sample = self._next_streamed(name) if streamed else self._next_indexed(name)
            loaded = self._load(name, index, sample)
            if loaded is not None:
                samples.append(loaded)
                continue
            bad += 1
            if not streamed and bad > len(self.datasets[name]):
                raise DatasetError(f"dataset {name!r}: every record read in a whole pass was bad")
        per_rank = size // self.world_size
        batch = self._collate(name, samples[self.rank * per_rank:(self.rank + 1) * per_rank])
        batch.any_image = any(pixels is not None for _, _, pixels in samples)
        return batch

    def _load(self, name: str, index: int, sample: Sample | None = None):
        """Read one record and open its image. A bad one stops the run with its dataset, file and record (and the
        image file or field the reader names), or is counted and skipped (on_bad_record: skip)."""
        try:
            sample = self.datasets[name][index] if sample is None else sample
            pixels = self.processor(sample.image) if sample.image is not None else None
            return index, sample, pixels
        except (DatasetError, ImageError, OSError, ValueError) as e:
            if not self.skip_bad:
                record = f", record {sample.source}" if sample is not None and sample.source else ""
                raise DatasetError(f"dataset {name!r}{record}: {e}", getattr(e, "reason", "bad record")) from e
            reason = getattr(e, "reason", "missing image" if isinstance(e, FileNotFoundError) else "bad record")
            self._count_skip(name, reason)
            return None

    def _collate(self, name: str, items: Sequence[tuple[int, Sample, Any]]) -> Batch:
        prompts, answers, has_image, pixels, sources, keys = [], [], [], [], [], []
        for _, sample, px in items:
            if px is not None:
                keys.append(sample.image if isinstance(sample.image, str) else None)
            prompt, segments = self.renderer(sample, px is not None)
            prompts.append(prompt)
            answers.append(segments)
            has_image.append(px is not None)
            sources.append(sample.source)
            if px is not None:
                pixels.append(px)
        pixel_values = torch.cat(pixels) if pixels else None
        return Batch(pixel_values, has_image, prompts, answers, sources, name, keys)

    def state_dict(self) -> dict:
        s = self.state
        return {"step": s.step, "cursors": dict(s.cursors), "epochs": dict(s.epochs),
                "skipped": {name: dict(counts) for name, counts in s.skipped.items()}}

    def load_state_dict(self, d: dict) -> None:
        skipped = {name: counts if isinstance(counts, dict) else {"bad record": counts}  # before counts had reasons
                   for name, counts in d["skipped"].items()}
        self.state = StreamState(d["step"], dict(d["cursors"]), dict(d["epochs"]), skipped)
        self._iters.clear()
