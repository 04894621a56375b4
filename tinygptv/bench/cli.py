# `tinygptv bench`: its arguments and the command itself; tinygptv/cli.py registers it with add_bench_parser(sub).
# Flow: arguments -> runner.py jobs (one process each) -> report.py table + JSON.
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinygptv.atomic import write_json_atomic
from tinygptv.checkpoint.release import PRESET_PREFIX
from tinygptv.cli_options import examples
from tinygptv.config import PRESETS
from tinygptv.engine.backends import BACKENDS, ENGINE_MODES, TORCH
from tinygptv.quant.modes import QUANT_MODES, modes_for

DEFAULT_PRESET = "tinygptv-stage3"
DEFAULT_OUT = Path("runs") / "bench" / "bench-results.json"
ENGINE_DEFAULT_MODES = ["int8", "int4"]  # an engine's fp32 mode is a parity check, and converting it needs 11 GB


def name_list(known, what: str):
    """An argparse type for a comma-separated list of names from `known`, each at most once."""

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {what}(s) {unknown or [text]}; known: {','.join(known)}")
        if len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(f"a {what} is listed twice: {text}")
        return names

    return parse


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add `bench` to the main parser's sub-parsers."""
    p = subparsers.add_parser(
        "bench", help="measure encode, prefill, decode, end-to-end time and peak memory per precision",
        description="For a preset (random weights: nothing to download) or a checkpoint, and each precision, measure "
                    "image encoding, prefill and decode speed, one whole answer and the peak memory of the process "
                    "(each precision in its own process, loading included). The same run measures the machine's "
                    "memory bandwidth and GEMM throughput and reports decode as a fraction of the bandwidth bound "
                    "and encoding as a fraction of GEMM throughput, and a stock-transformers fp32 reference for the "
                    "speed-up. Prints a table, writes JSON; never fails on a slow number. docs/bench.md explains "
                    "every column.",
        **examples("tinygptv bench --preset tiny --quant none,bf16     # a quick look (seconds)",
                   "tinygptv bench --preset tinygptv-stage3 --quant int8,int4,int8-dynamic"))
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a model folder of ours, a Hub id, a bundled model name or tinygptv-stage1..4 "
                                      "(the official release, after `tinygptv fetch --stage N`)")
    src.add_argument("--preset", choices=PRESETS.names(),
                     help=f"a preset with random weights (default: {DEFAULT_PRESET}, the full-size model)")
    p.add_argument("--quant", type=name_list(QUANT_MODES, "quant mode"), default=None,
                   help=f"comma-separated precisions, from {', '.join(QUANT_MODES)} (none = fp32 as saved; "
                        "default: the modes for --device: PyTorch's int8 / int4 / int8-dynamic kernels on the CPU, "
                        "bitsandbytes on CUDA)")
    p.add_argument("--backend", type=name_list(BACKENDS, "backend"), default=[TORCH],
                   help="comma-separated: what runs the vision tower and LLM, torch (default) and/or openvino; each "
                        f"runs the --quant modes it has (openvino: {', '.join(ENGINE_MODES['openvino'])}; without "
                        f"--quant, {' and '.join(ENGINE_DEFAULT_MODES)}). Example: --quant int4,int8-dynamic "
                        "--backend torch,openvino")
    p.add_argument("--image-size", type=_at_least(1), default=None,
                   help="image size in px (presets only; default: the model's)")
    p.add_argument("--image", help="encode this image file instead of random pixels (same speed, real input)")
    p.add_argument("--prompt-tokens", type=_at_least(0), default=64,
                   help="text tokens of the prompt; the image embeddings are spliced in on top (default 64)")
    p.add_argument("--new-tokens", type=_at_least(2), default=20, help="tokens each answer decodes (default 20)")
    p.add_argument("--warmup", type=_at_least(0), default=1, help="untimed runs before timing (default 1)")
    p.add_argument("--repeats", type=_at_least(1), default=3, help="timed runs; medians are reported (default 3)")
    p.add_argument("--threads", type=_at_least(1), default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the stock transformers fp32 eager reference (default: yes)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"JSON results file (default: {DEFAULT_OUT})")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where to measure (default: cpu; cuda measures the first GPU, peak VRAM included)")
    p.add_argument("--bandwidth-gib", type=float, default=1.0,
                   help="size of the buffer the bandwidth is measured over (default 1 GiB)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before one job is given up (default 3600)")
    p.set_defaults(func=cmd_bench)
    return p


def settings_from_args(args):
    from tinygptv.bench.runner import Settings
    from tinygptv.data.image_processor import open_image

    if args.image is not None:
        open_image(args.image)  # fail now, with the file's name, not once per job
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch sees no CUDA device")
    if args.bandwidth_gib <= 0:
        raise ValueError("--bandwidth-gib must be positive")
    if args.device != "cpu" and args.backend != [TORCH]:
        raise ValueError(f"--backend {','.join(args.backend)}: the engines run on the CPU; use --device cpu")

    return Settings(
        model=args.model or f"{PRESET_PREFIX}{args.preset or DEFAULT_PRESET}",  # presets: random weights, explicitly
        quant=args.quant or list(modes_for(args.device)), backend=args.backend,
        engine_quant=None if args.quant else ENGINE_DEFAULT_MODES, image_size=args.image_size, image=args.image,
        prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
        warmup=args.warmup, repeats=args.repeats, threads=args.threads, device=args.device,
        reference=args.reference, bandwidth_gib=args.bandwidth_gib, timeout_s=args.timeout,
    )


def cmd_bench(args) -> int:
    """Exit status 0 when every job produced its row, 1 when one failed (its row says why); the table and the JSON
    are written either way."""
    from tinygptv.bench.report import assemble, format_table
    from tinygptv.bench.runner import plan_jobs, run_jobs

    settings = settings_from_args(args)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def save(rows):
        write_json_atomic(args.out, assemble(settings.to_dict(), rows))

    rows = run_jobs(plan_jobs(settings), timeout_s=settings.timeout_s, log=log, on_row=save)
    result = assemble(settings.to_dict(), rows)
    print(format_table(result))
    log(f"bench: wrote {args.out}")
    return 0 if all(r.get("ok") for r in rows) else 1
