# The machinery every map-style reader shares: loading an annotation file, checking a record's fields, setting
# malformed records aside, the per-item seeded RNG, the lazy image check and the DATASETS registry.
# Data path: dataset files -> [reader built on RecordDataset] -> Sample -> batch builder -> model.
from __future__ import annotations

import json
import os
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, Iterator, Sequence, TypeVar

from tinygptv.data.datasets.sample import DatasetError, Sample
from tinygptv.registry import Registry

# name used in a recipe (exactly the official config key) -> builder taking the recipe's keyword arguments
DATASETS: Registry = Registry("dataset")

R = TypeVar("R")
PathLike = str | os.PathLike


def load_json(path: PathLike) -> Any:
    """Read one annotation file; a missing file is a FileNotFoundError and bad JSON a DatasetError, both naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DatasetError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None


def load_list(path: PathLike) -> list:
    """An annotation file whose top level must be a JSON list of records."""
    return expect(load_json(path), list, f"{Path(path).name}: top level")


def expect(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    """`value` must be of `kind` (bool never counts as a number); `what` names the file (and record) in the error."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(_type_name(k) for k in kinds)
        raise DatasetError(f"{what}: expected {names}, got {_type_name(type(value))}")
    return value


def need(record: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """Field `key` of a JSON object, checked for presence and type; errors name the file:record and the field."""
    expect(record, dict, where)
    if key not in record:
        raise DatasetError(f"{where}: missing field {key!r}")
    return expect(record[key], kind, f"{where}: field {key!r}")


def _type_name(kind: type) -> str:
    return {dict: "object", list: "list", str: "string", int: "integer", float: "number", type(None): "null"}.get(
        kind, kind.__name__
    )


class BadRecords(list):
    """The malformed records a reader met while parsing its files, as DatasetErrors. A reader parses every record
    inside `with bad.record():`, which sets a record that fails aside instead of stopping at it; what happens to
    them (stop at the first, or leave them out and count them) is decided by whoever uses the dataset:
    build_dataset and the training batch stream, through on_bad_record."""

    @contextmanager
    def record(self) -> Iterator[None]:
        try:
            yield
        except DatasetError as e:
            self.append(e)


def as_paths(ann_path: PathLike | Sequence[PathLike]) -> list[Path]:
    """One path or a list of them (LAVIS-style `ann_paths`), as a list."""
    if isinstance(ann_path, (str, os.PathLike)):
        return [Path(ann_path)]
    return [Path(p) for p in ann_path]


class RecordDataset(Generic[R]):
    """A map-style dataset over records parsed and validated up front (so a malformed file fails when the dataset
    is built, not hours into training).

    Subclasses fill `self.records` (any per-reader record type) and implement `make(record, rng) -> Sample`; the
    records they could not parse are in `self.bad_records` (see BadRecords), left out of the dataset. Every
    random choice (instruction template, answer, sentence) comes from `random.Random(hash((seed, index, epoch)))`,
    so item i of epoch e is the same on every run, in every worker, after every resume. Call `set_epoch` to vary
    the choices between epochs."""

    task: str | None = None

    def __init__(self, records: list[R], *, origin: str, seed: int = 0, check_images: bool = True,
                 bad_records: Sequence[DatasetError] = ()):
        if not records:
            first = f"; {len(bad_records)} malformed, the first: {bad_records[0]}" if bad_records else ""
            raise DatasetError(f"{origin}: no usable records{first}")
        self.records = records
        self.bad_records = list(bad_records)
        self.origin = origin  # the annotation file(s), for messages
        self.seed = int(seed)
        self.epoch = 0
        self.check_images = check_images

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng(self, index: int) -> random.Random:
        return random.Random(hash((self.seed, index, self.epoch)))

    def __getitem__(self, index: int) -> Sample:
        if not -len(self.records) <= index < len(self.records):
            raise IndexError(f"index {index} out of range for a dataset of {len(self.records)} items")
        index %= len(self.records)
        sample = self.make(self.records[index], self.rng(index))
        if self.check_images and isinstance(sample.image, str) and not os.path.isfile(sample.image):
            raise DatasetError(f"{sample.source}: image {sample.image} not found", reason="missing image")
        return sample

    def make(self, record: R, rng: random.Random) -> Sample:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} items from {self.origin}, seed={self.seed}, epoch={self.epoch})"
