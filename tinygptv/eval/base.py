# What every benchmark shares: the Item a reader yields, the Benchmark interface (read files, post-process, score),
# the registry, and small file helpers. Data path: benchmark files -> [reader: Item] -> prompt + template ->
# model.generate/score -> predictions -> [Benchmark.score / summarize] -> summary.
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from tinygptv.data.datasets.sample import DatasetError
from tinygptv.registry import Registry

PathLike = str | os.PathLike

STRICT = "strict"
COMPATIBLE = "tinygptv-compatible"
SCORES = (STRICT, COMPATIBLE)


@dataclass(frozen=True)
class Item:
    """One question of a benchmark. `target` is the ground truth in whatever form that benchmark's scorer reads
    (a list of answers, a label, a box); it is JSON-able so a run can be re-scored from the files alone."""

    id: str
    image: str  # path of the image file ("" when the benchmark was read for scoring only)
    instruction: str  # the benchmark prompt, before the template wraps it
    target: Any
    candidates: tuple[str, ...] = ()  # multiple-choice benchmarks (IconQA)
    group: str = ""  # sub-split the item belongs to (RefCOCO val / testA / testB)


@dataclass
class Loaded:
    items: list[Item]
    files: list[Path]  # every annotation file read, hashed into the summary
    split: str  # what was read, for the summary ("testdev-balanced", "val+testA+testB", ...)
    root: Path | None = None  # file names in the summary are relative to this folder (--data), so they compare


@dataclass
class ItemScore:
    strict: float
    compatible: float
    extra: dict[str, float] = field(default_factory=dict)  # per-item side scores a summary may average


class Benchmark:
    """A benchmark = how to read its published files, which prompt it gets, how its answers are post-processed and
    scored. Subclasses set the class attributes and implement `read` and `score_item`."""

    name: str = ""
    title: str = ""
    # "generate": free-form answer; "rank": pick the candidate of lowest LM loss (IconQA); "yesno": free-form answer
    # plus the first-token probability of yes vs no (Hateful Memes AUROC).
    mode: str = "generate"
    max_new_tokens: int = 20  # the official benchmark yaml uses 20 for every dataset
    # The template the official script used for this benchmark when the run uses the "eval" template, if different.
    eval_template: str | None = None
    # Rank mode: the text the official script put after each candidate when run with the "eval" template.
    eval_answer_suffix: str | None = None
    splits: tuple[str, ...] = ()  # selectable sub-splits (RefCOCO); empty: one fixed split
    needs_data: bool = True

    def read(self, data: Path | None, *, split: str | None = None, images: Path | None = None,
             need_images: bool = True) -> Loaded:
        raise NotImplementedError

    def parse(self, raw: str) -> str:
        """The official post-processing of a generated answer (TinyGPT-V's eval_vqa.py): drop "<unk>", cut at the
        first "###", keep the text after the last "Assistant:", strip. Letter case is left to the scorers."""
        return raw.replace("<unk>", "").split("###")[0].split("Assistant:")[-1].strip()

    def answer_of(self, pred: dict) -> str:
        """The post-processed answer of a prediction record: its "answer", else its "raw" output parsed. Lets
        predictions from other systems be scored when they only carry one of the two."""
        if isinstance(pred.get("answer"), str):
            return pred["answer"]
        if isinstance(pred.get("raw"), str):
            return self.parse(pred["raw"])
        raise ValueError(f"prediction {pred.get('id')!r} has neither an 'answer' nor a 'raw' string")

    def score_item(self, item: Item, pred: dict) -> ItemScore:
        raise NotImplementedError

    def summarize(self, items: Sequence[Item], preds: Sequence[dict], scores: Sequence[ItemScore]) -> dict:
        """Both scores as percentages. The default is the mean per-item score ("accuracy"); benchmarks with more
        metrics (AUROC, per-split accuracy) extend it."""
        return {
            STRICT: {"accuracy": percent(s.strict for s in scores)},
            COMPATIBLE: {"accuracy": percent(s.compatible for s in scores)},
        }


BENCHMARKS: Registry[Benchmark] = Registry("benchmark")


def raw_text(pred: dict, answer: str, drop_unk: bool = True) -> str:
    """The whole generated text (official scripts that match substrings searched it uncut), "<unk>" removed where
    the official script removed it (GQA's and VSR's did not); the post-processed answer when the record has no raw
    output."""
    raw = pred.get("raw")
    if not isinstance(raw, str):
        return answer
    return raw.replace("<unk>", "").strip() if drop_unk else raw


def percent(values: Iterable[float]) -> float | None:
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else None


# --- file helpers -------------------------------------------------------------------------------------------------


def first_existing(folder: Path, names: Sequence[str], what: str) -> Path:
    """The first of `names` (relative to `folder`) that exists; the error lists every name tried."""
    for name in names:
        path = folder / name
        if path.is_file():
            return path
    tried = ", ".join(str(folder / n) for n in names)
    raise FileNotFoundError(f"{what} not found; looked for {tried}")


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{n}: not valid JSON ({e})") from None
    return rows


def field_of(record: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """A required field of a JSON record, type-checked; the error names the file, the record and the field."""
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected an object, got {type(record).__name__}")
    if key not in record:
        raise DatasetError(f"{where}: missing field {key!r}")
    value = record[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise DatasetError(f"{where}: field {key!r} has type {type(value).__name__}")
    return value


class ImageFinder:
    """Finds an image among candidate folders (the layouts publishers and MiniGPT-v2 use differ), trying the folder
    that worked last first. With need=False nothing is checked: scoring never opens images."""

    def __init__(self, roots: Sequence[Path], need: bool = True):
        self.roots = [Path(r) for r in roots]
        self.need = need
        self._last = 0

    def find(self, name: str) -> str:
        if not self.need:
            return ""
        order = [self._last] + [i for i in range(len(self.roots)) if i != self._last]
        for i in order:
            path = self.roots[i] / name
            if path.is_file():
                self._last = i
                return str(path)
        tried = ", ".join(str(r / name) for r in self.roots)
        raise FileNotFoundError(f"image {name} not found; looked for {tried} (pass --images DIR if the images are "
                                f"elsewhere)")


def image_roots(data: Path | None, images: Path | None, *relative: str) -> list[Path]:
    """--images first (when given), then the layout folders under --data."""
    roots = [Path(images)] if images is not None else []
    if data is not None:
        roots += [Path(data) / r if r else Path(data) for r in relative]
    return roots


def sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def need_data(data: Path | None, benchmark: str) -> Path:
    if data is None:
        raise ValueError(f"--data is required for {benchmark}: the folder with its published files (docs/eval.md)")
    data = Path(data)
    if not data.is_dir():
        raise FileNotFoundError(f"{data}: data folder not found")
    return data


def check_split(benchmark: Benchmark, split: str | None) -> list[str]:
    """The sub-splits to read: the one asked for, or all of them."""
    if split is None:
        return list(benchmark.splits)
    if split not in benchmark.splits:
        raise ValueError(f"{benchmark.name} has splits {', '.join(benchmark.splits)}, not {split!r}")
    return [split]


def binary_label(row: dict, where: str) -> int:
    """A 0/1 `label` field (VSR true/false, Hateful Memes hateful/not), checked and named in errors."""
    label = field_of(row, "label", (int, bool), where)
    if int(label) not in (0, 1):
        raise DatasetError(f"{where}: field 'label' must be 0 or 1, got {label!r}")
    return int(label)
