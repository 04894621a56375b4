# Reader for the stage-1/2 caption data (`laion`, `cc_sbu`): webdataset tar shards, streamed with `tarfile`.
# Data path: {00000..05244}.tar shards -> [this reader] -> Sample (image bytes, caption) -> batch builder -> model.
"""Reader for the stage-1/2 pretraining data (`laion`, `cc_sbu`): webdataset tar shards read with `tarfile`.

A shard holds samples as consecutive members sharing a key, e.g. `000123.jpg` + `000123.json` (+ `000123.txt`,
ignored); the key is the member name up to the first dot of its base name, as in webdataset. Each sample becomes
a caption-only `Sample`: no instruction, answer = blip_caption(json["caption"]) (the stage-1/2 configs set the
`blip_caption` text processor). `Sample.image` is an `EncodedImage`: the member's bytes, named `shard:key.ext` (the
tar member has no path of its own); the batch builder decodes it with open_image, like every other image.

This is an iterable, not a map-style dataset, because shards are read front to back. Shards are given as a list
or a brace pattern (`/data/laion/{00000..05244}.tar`, expanded here). Per epoch (`set_epoch`), the shard order and
a shuffle buffer (official size 1000) are driven by a RNG seeded from (seed, epoch, worker slot), so a run is
reproducible. With several DataLoader workers (and `rank`/`world_size` under DDP) each worker reads a disjoint set
of shards. `resample=True` reproduces the official `ResampledShards`: an endless stream of shards drawn with
replacement.

Incomplete samples (no image, no json, no caption) raise a DatasetError naming shard:key; with `strict=False` they
are skipped and counted in `skipped` (the official pipeline's `warn_and_continue`; the count is per process). An
undecodable image fails where it is decoded, in the batch builder, named the same way.
"""
from __future__ import annotations

import json
import os
import random
import re
import tarfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tinygptv.data.datasets.base import DATASETS, PathLike, need
from tinygptv.data.image_file import EncodedImage
from tinygptv.data.datasets.sample import DatasetError, Sample
from tinygptv.data.datasets.text import blip_caption

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: key, extension


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: `{00000..00003}` (zero padding kept), `{a,b}`, several groups -> product."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
    numeric = _RANGE.fullmatch(body)
    if numeric:
        a, b = numeric.groups()
        padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-")[0] == "0" for s in (a, b))
        width = max(len(a), len(b)) if padded else 0
        step = 1 if int(b) >= int(a) else -1
        options = [str(n).zfill(width) for n in range(int(a), int(b) + step, step)]
    else:
        options = body.split(",")
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def expand_shards(shards: str | PathLike | Sequence[str | PathLike]) -> list[str]:
    patterns = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    return [path for pattern in patterns for path in expand_braces(os.fspath(pattern))]


def _worker_slot() -> tuple[int, int]:
    """(worker id, number of workers) inside a torch DataLoader worker, else (0, 1)."""
    try:
        from torch.utils.data import get_worker_info
    except ImportError:  # pragma: no cover - torch is a package dependency
        return 0, 1
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _buffer_shuffle(items: Iterable[Sample], size: int, rng: random.Random) -> Iterator[Sample]:
    if size <= 1:
        yield from items
        return
    buffer: list[Sample] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        k = rng.randrange(size)
        yield buffer[k]
        buffer[k] = item
    rng.shuffle(buffer)
    yield from buffer


class CaptionShards:
    """Caption-only pretraining samples streamed from webdataset tar shards (see the module docstring)."""

    def __init__(self, shards: str | PathLike | Sequence[str | PathLike], *, seed: int = 0, shuffle: bool = True,
                 buffer_size: int = 1000, resample: bool = False, strict: bool = True, rank: int = 0,
                 world_size: int = 1):
        self.shards = expand_shards(shards)
        if not self.shards:
            raise DatasetError(f"{shards!r}: no shards given")
        for shard in self.shards:
            if not os.path.isfile(shard):
                raise FileNotFoundError(f"{shard}: shard not found")
        self.seed, self.epoch = int(seed), 0
        self.shuffle, self.buffer_size, self.resample, self.strict = shuffle, buffer_size, resample, strict
        self.rank, self.world_size = rank, world_size
        self.skipped = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[Sample]:
        worker, workers = _worker_slot()
        slot, slots = self.rank * workers + worker, self.world_size * workers
        rng = random.Random(hash((self.seed, self.epoch, slot)))
        if self.resample:
            shards: Iterable[str] = iter(lambda: rng.choice(self.shards), None)  # endless, with replacement
        else:
            order = list(self.shards)
            if self.shuffle:  # the same order in every slot, so the slots split it without overlap
                random.Random(hash((self.seed, self.epoch))).shuffle(order)
            shards = order[slot::slots]
        samples = (sample for shard in shards for sample in self.read_shard(shard))
        yield from _buffer_shuffle(samples, self.buffer_size if self.shuffle else 0, rng)

    def read_shard(self, shard: str) -> Iterator[Sample]:
        """The samples of one shard, in tar order."""
        key, files = None, {}
        with tarfile.open(shard, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                match = _KEY.match(member.name)
                if match is None or Path(member.name).name.startswith("."):
                    continue
                if key is not None and match.group(1) != key:
                    sample = self._sample(shard, key, files)
                    if sample is not None:
                        yield sample
                    files = {}
                key = match.group(1)
                files[match.group(2).lower()] = tar.extractfile(member).read()
        if key is not None:
            sample = self._sample(shard, key, files)
            if sample is not None:
                yield sample

    def _sample(self, shard: str, key: str, files: dict[str, bytes]) -> Sample | None:
        where = f"{Path(shard).name}:{key}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
        if ext is None:
            return self._bad(f"{where}: no image member (.{', .'.join(IMAGE_EXTENSIONS)})")
        if "json" not in files:
            return self._bad(f"{where}: no .json member")
        try:
            caption = need(json.loads(files["json"]), "caption", str, f"{where}.json")
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            return self._bad(f"{where}.json: not valid JSON ({e})")
        except DatasetError as e:
            return self._bad(str(e))
        return Sample(EncodedImage(f"{where}.{ext}", files[ext]), [(None, blip_caption(caption))], None, where)

    def _bad(self, message: str) -> None:
        if self.strict:
            raise DatasetError(message)
        self.skipped += 1
        return None

    def __repr__(self) -> str:
        return f"CaptionShards({len(self.shards)} shards, seed={self.seed}, epoch={self.epoch})"


DATASETS.register("laion", CaptionShards)
DATASETS.register("cc_sbu", CaptionShards)
