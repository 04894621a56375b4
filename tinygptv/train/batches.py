# From datasets to model inputs: each step draws one dataset by sample ratio (as LAVIS's MultiIterLoader does),
# takes a batch of its Samples, opens the images and renders the prompts. Deterministic by (seed, step), resumable.
# Data path: dataset files -> readers -> Sample -> [this] -> Batch -> model.
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from tinygptv.data.datasets.sample import DatasetError, Sample
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
    skipped: dict[str, int] = field(default_factory=dict)  # bad records skipped, per dataset


class MixedBatches:
    """One dataset per step, chosen with probability sample_ratio / sum of ratios; batches of that dataset's
    batch size; each pass over a dataset in a fresh seeded order (drop_last). Under DDP every rank draws the same
    dataset and global batch and keeps its own slice, so one process and N processes see the same samples."""

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
            if hasattr(ds, "__len__") and len(ds) < batch_sizes[name]:
                raise DatasetError(f"dataset {name!r} has {len(ds)} usable records, fewer than its batch size "
                                   f"{batch_sizes[name]}")
            if batch_sizes[name] % world_size:
                raise ValueError(f"dataset {name!r}: batch size {batch_sizes[name]} does not split over "
                                 f"{world_size} processes")

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
            try:
                sample = next(self._iters[name])
            except StopIteration:
                del self._iters[name]
                self._next_pass(name)
                continue
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
        """Read one record and open its image. A bad one stops the run with its dataset, file and record, or is
        counted and skipped (on_bad_record: skip)."""
        try:
            sample = self.datasets[name][index] if sample is None else sample
            pixels = self.processor(sample.image) if sample.image is not None else None
            return index, sample, pixels
        except (DatasetError, OSError, ValueError) as e:
            if not self.skip_bad:
                raise DatasetError(f"dataset {name!r}, record {index}: {e}") from e
            self.state.skipped[name] = self.state.skipped.get(name, 0) + 1
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
        return {"step": s.step, "cursors": dict(s.cursors), "epochs": dict(s.epochs), "skipped": dict(s.skipped)}

    def load_state_dict(self, d: dict) -> None:
        self.state = StreamState(d["step"], dict(d["cursors"]), dict(d["epochs"]), dict(d["skipped"]))
        self._iters.clear()
