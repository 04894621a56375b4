# Scoring a predictions file against a benchmark's files, without a model: used at the end of every run and by
# `tinygptv eval score`. Data path: benchmark files -> reader -> items; predictions.jsonl -> [join by id ->
# Benchmark.score_item -> Benchmark.summarize] -> summary with both scores.
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from tinygptv.eval.base import BENCHMARKS, Benchmark, Item, sha256_file


def load_predictions(path: Path, *, repair: bool = False) -> list[dict]:
    """Read a predictions JSONL (one object with an "id" per line). A run killed mid-write can leave a last line
    without its newline: with repair=True that fragment is cut off the file (the item is then predicted again),
    otherwise it is an error, as is any other malformed line. Later duplicates of an id are ignored."""
    path = Path(path)
    if not path.exists():
        if repair:
            return []
        raise FileNotFoundError(f"{path}: predictions file not found")
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail.strip():
        if not repair:
            raise ValueError(f"{path}: the last line is incomplete (no newline); was the run interrupted?")
        with open(path, "r+b") as f:
            f.truncate(len(data) - len(tail))
    preds, seen = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(rec, dict) or "id" not in rec:
            raise ValueError(f"{path}:{n}: a prediction must be an object with an 'id'")
        rec["id"] = str(rec["id"])
        if rec["id"] not in seen:
            seen.add(rec["id"])
            preds.append(rec)
    return preds


def score_predictions(bench: Benchmark, items: Sequence[Item], preds: Sequence[dict], *, files: Sequence[Path],
                      split: str, root: Path | None = None) -> dict:
    """Both scores over the items that have a prediction. Predictions for ids the benchmark does not have are an
    error (a wrong benchmark, split or file); items without a prediction are counted as `missing` and left out."""
    by_id = {it.id: it for it in items}
    unknown = [p["id"] for p in preds if p["id"] not in by_id]
    if unknown:
        raise ValueError(f"{len(unknown)} prediction id(s) are not items of {bench.name} ({split or 'default split'}): "
                         f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    pred_by_id = {p["id"]: p for p in preds}
    pairs = [(it, pred_by_id[it.id]) for it in items if it.id in pred_by_id]
    scored_items = [it for it, _ in pairs]
    scored_preds = [p for _, p in pairs]
    scores = [bench.score_item(it, p) for it, p in pairs]
    return {
        "benchmark": bench.name,
        "title": bench.title,
        "split": split,
        "n": len(pairs),
        "items": len(items),
        "missing": len(items) - len(pairs),
        "scores": bench.summarize(scored_items, scored_preds, scores),
        "files": {_relative(p, root): sha256_file(p) for p in files},
    }


def _relative(path: Path, root: Path | None) -> str:
    """A file's name relative to the data folder (summaries from different machines then compare)."""
    if root is not None:
        try:
            return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            pass
    return str(path)


def score_file(benchmark: str, data: Path | None, predictions: Path, *, split: str | None = None,
               limit: int | None = None) -> dict:
    """`tinygptv eval score`: re-score a predictions file (ours or another system's: each line needs an "id" and an
    "answer" or "raw"; Hateful Memes AUROC also needs "p_yes") against the benchmark's files. No model, no images."""
    bench = BENCHMARKS[benchmark]
    loaded = bench.read(Path(data) if data is not None else None, split=split, need_images=False)
    preds = load_predictions(predictions)
    items = loaded.items
    if limit is not None:  # score the first `limit` items only, ignoring predictions for later ones
        items = items[:limit]
        wanted = {it.id for it in items}
        preds = [p for p in preds if p["id"] in wanted]
    summary = score_predictions(bench, items, preds, files=loaded.files, split=loaded.split, root=loaded.root)
    summary["predictions"] = str(predictions)
    summary["predictions_sha256"] = sha256_file(predictions)
    return summary
