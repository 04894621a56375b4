# `tinygptv quantize`: a model folder / Hub id / preset -> [quantize, score against itself] -> a quantized folder that
# every inference command loads directly (config.quant says how), so small machines never hold the fp32 weights.
from __future__ import annotations

import json
import sys
from pathlib import Path

from tinygptv.cli_options import add_backend_arg, examples
from tinygptv.engine.backends import TORCH, check_backend
from tinygptv.quant.modes import BNB_MODES, QUANT_MODES


def add_quantize_parser(sub):
    p = sub.add_parser(
        "quantize", help="save a quantized copy of a model and report what it costs in answers",
        description="Load a model, quantize it (bf16, int8 or int4 weight-only for the LLM's linears, int8-dynamic; "
                    "bitsandbytes' bnb-int8 and bnb-nf4 only report, since they quantize on loading), "
                    "and save a self-contained copy that `ask`, `chat`, `serve`, `demo`, `eval` and `bench` load "
                    "as it is. Before saving it scores the copy against the original on a fixed prompt set "
                    "(held-out synthetic scenes and text-only turns): top-1 agreement of the next token and mean "
                    "KL divergence of the next-token distributions over every answer position. With --backend "
                    "openvino the LLM is converted for the engine instead (kept with the model, where every command "
                    "with the same --model, --backend and --quant reuses it) and scored against the PyTorch model.",
        **examples("tinygptv quantize tinygptv-nano --quant int8 --report-only",
                   "tinygptv quantize tinygptv-stage3 --quant int4 --out models/tinygptv-stage3-int4",
                   "tinygptv quantize tinygptv-nano --quant int4 --backend openvino --report-only"))
    p.add_argument("model", help="a model folder, Hub id, tinygptv-stage1..4 (after `tinygptv fetch --stage N`) or "
                                 "preset:NAME (random weights)")
    p.add_argument("--quant", required=True, choices=[m for m in QUANT_MODES if m != "none"])
    p.add_argument("--out", type=Path, help="output folder (omit with --report-only)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --out even if it holds files quantize did not write (they are kept)")
    p.add_argument("--load-dtype", choices=("fp32", "bf16"), default="fp32",
                   help="precision to load the original in (bf16 halves the memory needed; the report then "
                        "compares against the bf16 model)")
    p.add_argument("--report-only", action="store_true", help="score the mode, save nothing")
    p.add_argument("--device", default="auto",
                   help="where the quantized model is scored: cpu, cuda[:N] or auto (default: the GPU for the "
                        "bitsandbytes modes when there is one)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_backend_arg(p)
    p.set_defaults(func=cmd_quantize)
    return p


def cmd_quantize(args) -> int:
    # the command's imports wait for the command: `tinygptv --help` stays instant
    from tinygptv.atomic import check_output_dir
    from tinygptv.checkpoint.loading import pick_device
    from tinygptv.checkpoint.native import is_model_entry, save_pretrained
    from tinygptv.quant.apply import quantize_model

    if args.backend != TORCH:
        return quantize_for_engine(args)
    if args.quant in BNB_MODES and not args.report_only:
        raise ValueError(f"{args.quant} is not saved: bitsandbytes quantizes as the weights reach the device, so "
                         f"load the unquantized model with --quant {args.quant} (add --report-only to score it)")
    if args.out is None and not args.report_only:
        raise ValueError("--out is required (or pass --report-only)")
    if not args.report_only:  # before minutes of loading, quantizing and scoring, not after
        check_output_dir(args.out, is_model_entry, overwrite=args.overwrite, what="model folder")
    device = pick_device(args.device, args.quant)
    model = load_original(args)
    if model.config.quant != "none":
        raise ValueError(f"{args.model} is already quantized ({model.config.quant}); start from the original")
    report = score_change(model, lambda m: quantize_model(m, args.quant, device).to(device),
                          f"before and after quantizing to {args.quant}")
    result = {"model": args.model, "quant": args.quant, "against": args.load_dtype, **report.to_dict()}
    print_report(args, result, report)
    if not args.report_only:
        save_pretrained(model, args.out, overwrite=args.overwrite)
        print(f"saved {args.out}", file=sys.stderr)
    return 0


def load_original(args):
    """The model to quantize or convert, at --load-dtype."""
    import torch

    from tinygptv.checkpoint.loading import load_model

    return load_model(args.model, dtype=torch.bfloat16 if args.load_dtype == "bf16" else None)


def score_change(model, change, what: str):
    """How far `change` (applied to the model in place: quantizing, or attaching an engine) moves its answers: the
    next-token distributions over the fixed prompt set, before and after."""
    from tinygptv.data.templates import inference_template
    from tinygptv.quant.quality import answer_logits, compare, prompt_set

    items = prompt_set(inference_template(model.config.prompt.template))
    print(f"scoring {len(items)} fixed prompts {what} ...", file=sys.stderr)
    reference = answer_logits(model, items)
    change(model)
    return compare(reference, answer_logits(model, items))


def print_report(args, result: dict, report) -> None:
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        on = f" on --backend {args.backend}" if args.backend != TORCH else ""
        print(f"{args.quant}{on} vs {args.load_dtype}: top-1 agreement {report.top1_agreement:.1%}, mean KL "
              f"{report.mean_kl:.4f} nats over {report.positions} answer positions")


def quantize_for_engine(args) -> int:
    """--backend openvino: the model's LLM converted for the engine (kept where every command with the same --model,
    --backend and --quant finds it: inside the model folder, or in the cache for the bundled model) and scored
    against the PyTorch model it came from. A preset's random weights differ from run to run, and an fp32
    conversion made from bf16 weights is not the fp32 model: those are scored from a temporary folder."""
    import tempfile

    from tinygptv.checkpoint.loading import engine_target
    from tinygptv.engine.attach import attach_engine
    from tinygptv.engine.store import EngineFolder

    check_backend(args.backend, args.quant, args.device)
    if args.out is not None:
        raise ValueError(f"--out: with --backend {args.backend} the conversion is kept with the model (inside its "
                         f"folder, or in the cache) and found there by --model {args.model} --backend {args.backend} "
                         f"--quant {args.quant}; leave out --out")
    model_dir, _, folder = engine_target(args.model, args.backend, args.quant)
    model = load_original(args)
    keep = not args.report_only and model_dir is not None and (args.quant != "none" or args.load_dtype == "fp32")
    with tempfile.TemporaryDirectory(prefix="tinygptv-engine-") as scratch:
        if not keep:
            folder = EngineFolder(Path(scratch) / folder.path.name, folder.key, folder.backend, folder.mode)
        report = score_change(model, lambda m: attach_engine(m, folder),
                              f"in PyTorch ({args.load_dtype}) and on {args.backend} ({args.quant})")
    result = {"model": args.model, "quant": args.quant, "backend": args.backend, "against": args.load_dtype,
              **report.to_dict()}
    print_report(args, result, report)
    if keep:
        print(f"kept the conversion in {folder.path}", file=sys.stderr)
    return 0
