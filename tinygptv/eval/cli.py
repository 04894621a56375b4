# `tinygptv eval` (run a model on a benchmark) and `tinygptv eval score` (re-score a predictions file), registered
# into the main parser by tinygptv/cli.py. Data path: benchmark files -> runner -> predictions -> scorer -> table/JSON.
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tinygptv.checkpoint.release import MODEL_NAMES_HELP
from tinygptv.cli_options import add_precision_args, examples, load_for_args
from tinygptv.config import DEFAULT_MODEL
from tinygptv.data.templates import TEMPLATES
from tinygptv.eval import BENCHMARKS, COMPATIBLE, STRICT
from tinygptv.eval.base import need_data
from tinygptv.eval.scoring import score_file


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add `eval` (and its `score` sub-command) to the main parser's sub-parsers."""
    names = BENCHMARKS.names()
    p = subparsers.add_parser(
        "eval", help="evaluate a model on a benchmark (GQA, VSR, IconQA, VizWiz, HM, OK-VQA, RefCOCO*, easy-VQA)",
        description="Run a model on a benchmark's published files with the paper's prompt, keep every prediction "
                    "in {out}/{benchmark}.predictions.jsonl (a rerun into the same --out resumes), and report two "
                    "scores: strict (official VQA normalisation, exact match) and tinygptv-compatible (what the "
                    "official TinyGPT-V script computes). `tinygptv eval score ...` re-scores a predictions file "
                    "without a model. docs/eval.md: where to get each benchmark and what the scores mean.",
        usage="tinygptv eval --benchmark NAME --out DIR [--data DIR] [options]\n"
              "       tinygptv eval score --benchmark NAME --predictions FILE [--data DIR]",
        **examples("tinygptv eval --benchmark easyvqa --limit 200 --out runs/eval/nano",
                   "tinygptv eval --benchmark gqa --data data/gqa --model tinygptv-stage4 --out runs/eval/stage4",
                   "tinygptv eval score --benchmark easyvqa --predictions runs/eval/nano/easyvqa.predictions.jsonl"))
    p.add_argument("--benchmark", choices=names, metavar="NAME",
                   help=f"which benchmark (required): {', '.join(names)}")
    p.add_argument("--data", type=Path, help="folder with the benchmark's files as published (not for easyvqa)")
    p.add_argument("--images", type=Path, help="image folder, when the images are not where the layout puts them")
    p.add_argument("--split", help="sub-split: refcoco/refcoco+ val|testA|testB, refcocog val|test, "
                                   "hm dev|dev_seen|dev_unseen (default: all / the official one)")
    p.add_argument("--model", default=None, help=f"{MODEL_NAMES_HELP} (default: the package's default model)")
    add_precision_args(p)
    p.add_argument("--template", choices=TEMPLATES.names(), default=None,
                   help="prompt template (default: 'eval', the official benchmark template, for official-style "
                        "models; a model's own template otherwise)")
    p.add_argument("--limit", type=int, help="evaluate the first N items only")
    p.add_argument("--batch-size", type=int, default=16, help="items per batch (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: 20 as the official benchmark config (10 for easyvqa)")
    p.add_argument("--no-stop", action="store_true",
                   help="do not stop generating at end_sym/### (the official scripts did not; the answer is still cut "
                        "there, the raw text keeps the rest)")
    p.add_argument("--no-share-prefix", action="store_true",
                   help="encode every prompt in full instead of running the part questions about one image share "
                        "once per image (same inputs; slower)")
    p.add_argument("--no-merge-lora", action="store_true",
                   help="keep LoRA as separate adapters (by default it is folded into the weights before the run: "
                        "the same function, ~25 %% faster on a CPU)")
    p.add_argument("--out", type=Path, help="output folder for predictions and summary (required)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard predictions already in --out; also write into a folder that holds files eval did "
                        "not write (they are kept)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice, one per core); on a machine other jobs "
                        "share, 1 avoids the stalls of threads waiting for each other")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary JSON instead of the table")
    p.set_defaults(func=cmd_eval)

    sub = p.add_subparsers(dest="eval_command", title="re-scoring without a model", metavar="score")
    s = sub.add_parser(
        "score", help="score an existing predictions file (no model needed)",
        description="Score a predictions JSONL against a benchmark's files: ours, or another system's (one JSON "
                    "object per line with the item's \"id\" and its \"answer\" or \"raw\" output; Hateful Memes "
                    "AUROC also reads \"p_yes\", IconQA \"choice\").")
    s.add_argument("--benchmark", required=True, choices=names)
    s.add_argument("--data", type=Path, help="folder with the benchmark's files (not for easyvqa)")
    s.add_argument("--split", help="sub-split, as for `tinygptv eval`")
    s.add_argument("--predictions", type=Path, required=True)
    s.add_argument("--limit", type=int, help="score the first N items only")
    s.add_argument("--json", action="store_true", help="print the summary JSON instead of the table")
    s.set_defaults(func=cmd_eval_score)
    return p


def cmd_eval(args) -> int:
    import torch  # the command's imports wait for the command: `tinygptv --help` stays instant

    from tinygptv.eval.runner import check_out_dir, run_eval

    if args.benchmark is None or args.out is None:
        raise ValueError("--benchmark and --out are required (or use `tinygptv eval score ...`)")
    check_out_dir(args.out, args.overwrite)  # before loading a model
    if BENCHMARKS[args.benchmark].needs_data:  # fail on a missing folder before loading a model
        need_data(args.data, args.benchmark)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    model_name = args.model or DEFAULT_MODEL
    model = load_for_args(args, model_name, merge_lora=False)  # run_eval merges, after hashing the config as stored
    summary = run_eval(
        model, args.benchmark, args.data, args.out, model_name=model_name, split=args.split, images=args.images,
        limit=args.limit, batch_size=args.batch_size, template=args.template, max_new_tokens=args.max_new_tokens,
        stop=not args.no_stop, share_prefix=not args.no_share_prefix, merge_lora=not args.no_merge_lora,
        overwrite=args.overwrite, progress=not args.no_progress,
    )
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def cmd_eval_score(args) -> int:
    summary = score_file(args.benchmark, args.data, args.predictions, split=args.split, limit=args.limit)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    if summary["missing"]:
        print(f"note: {summary['missing']} of {summary['items']} items have no prediction and are not scored",
              file=sys.stderr)
    return 0


def format_summary(summary: dict) -> str:
    """Both scores side by side, one row per metric."""
    scores = summary["scores"]
    metrics = list(dict.fromkeys([*scores[STRICT], *scores[COMPATIBLE]]))
    head = f"{summary['title']} ({summary['split']}): {summary['n']} of {summary['items']} items scored"
    if summary.get("model"):
        head += f", model {summary['model']}, template {summary['template']}"
    width = max(len(m) for m in metrics + ["metric"])
    rows = [head, f"{'metric':<{width}}  {STRICT:>8}  {COMPATIBLE:>19}"]
    for m in metrics:
        rows.append(f"{m:<{width}}  {_cell(scores[STRICT].get(m)):>8}  {_cell(scores[COMPATIBLE].get(m)):>19}")
    if summary.get("predictions"):
        rows.append(f"predictions: {summary['predictions']}")
    return "\n".join(rows)


def _cell(value) -> str:
    return "-" if value is None else f"{value:.2f}"
