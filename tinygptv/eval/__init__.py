# Benchmark evaluation: readers for each benchmark's published files, the paper's prompts, batched generation /
# candidate ranking, predictions kept as JSONL, and two scores (strict and tinygptv-compatible). Data path:
# benchmark files -> reader + prompt -> model.generate / scoring -> predictions.jsonl -> scorer -> summary.json.
"""Evaluation harness. `run_eval` runs a model on a benchmark; `score_file` re-scores a predictions file without a
model; `BENCHMARKS` maps each name (gqa, vsr, iconqa, vizwiz, hm, okvqa, refcoco, refcoco+, refcocog, easyvqa) to
its reader and scorer. docs/eval.md says where each benchmark's files come from and how the scores differ."""
from tinygptv.eval.base import BENCHMARKS, COMPATIBLE, SCORES, STRICT, Benchmark, Item, ItemScore, Loaded
from tinygptv.eval import easyvqa, gqa, hm, iconqa, okvqa, refcoco, scenes, vizwiz, vsr  # noqa: F401
from tinygptv.eval.hm import auroc
from tinygptv.eval.prompts import PROMPTS
from tinygptv.eval.refcoco import iou, official_iou, parse_box
from tinygptv.eval.runner import config_sha256, default_template, run_eval
from tinygptv.eval.scoring import load_predictions, score_file, score_predictions
from tinygptv.eval.vqa_normalize import normalize_answer, official_vqa_accuracy, vqa_accuracy

__all__ = [
    "BENCHMARKS", "COMPATIBLE", "PROMPTS", "SCORES", "STRICT", "Benchmark", "Item", "ItemScore", "Loaded", "auroc",
    "config_sha256", "default_template", "iou", "load_predictions", "normalize_answer", "official_iou",
    "official_vqa_accuracy", "parse_box", "run_eval", "score_file", "score_predictions", "vqa_accuracy",
]
