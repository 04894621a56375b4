# Benchmark evaluation: readers for each benchmark's published files, the paper's prompts, batched generation /
# candidate ranking, predictions kept as JSONL, and two scores (strict and tinygptv-compatible). Data path:
# benchmark files -> reader + prompt -> model.generate / scoring -> predictions.jsonl -> scorer -> summary.json.
"""Evaluation harness. Importing the package registers every benchmark in `BENCHMARKS` (gqa, vsr, iconqa, vizwiz,
hm, okvqa, refcoco, refcoco+, refcocog, easyvqa, scenes), each with its reader and scorer, without importing torch.
`tinygptv.eval.runner.run_eval` runs a model on one; `tinygptv.eval.scoring.score_file` re-scores a predictions
file without a model. docs/eval.md says where each benchmark's files come from and how the scores differ."""
from tinygptv.eval import easyvqa, gqa, hm, iconqa, okvqa, refcoco, scenes, vizwiz, vsr  # noqa: F401  (registers)
from tinygptv.eval.base import BENCHMARKS, COMPATIBLE, SCORES, STRICT

__all__ = ["BENCHMARKS", "COMPATIBLE", "SCORES", "STRICT"]
