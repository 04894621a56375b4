# The `tinygptv` command: wires one subcommand per way of using the data path (ask/chat run it, info describes it,
# convert fills it, train/eval/serve/demo/quantize/bench use it) and turns user errors into one-line messages.
# Parsers import nothing heavy; each command imports what it needs, so `tinygptv --help` answers at once.
from __future__ import annotations

import argparse
import gc
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from tinygptv.bench.cli import add_bench_parser
from tinygptv.checkpoint.fetch_cli import add_fetch_parser
from tinygptv.cli_options import (
    add_input_limit_args, add_model_args, examples, generation_settings, input_limits, load_for_args,
)
from tinygptv.config import PRESETS
from tinygptv.eval.cli import add_eval_parser
from tinygptv.quant.cli import add_quantize_parser
from tinygptv.serve.demo_cli import add_demo_parser
from tinygptv.serve.serve_cli import add_serve_parser

DEBUG_ENV = "TINYGPTV_DEBUG"  # set to 1 for a full traceback instead of the one-line error


def subcommand(sub, name: str, help: str, description: str, *example_lines: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description, **examples(*example_lines))


def versions() -> str:
    parts = []
    for name in ("tinygptv", "torch", "transformers"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    return ", ".join(parts) + f", python {sys.version.split()[0]}"


# --- commands --------------------------------------------------------------------------------------------------------

def _session(args):
    """A ChatSession with the command's decoding settings, input limits and image. A bad flag or image fails before
    the model loads, naming it."""
    from tinygptv.data.image_file import check_image

    settings = generation_settings(args)
    max_prompt_tokens, max_pixels = input_limits(args)
    if args.image is not None:
        check_image(args.image, max_pixels=max_pixels)
    from tinygptv.serve.chat import ChatSession  # torch and transformers: after the cheap checks

    session = ChatSession(load_for_args(args), template=args.template, settings=settings,
                          max_prompt_tokens=max_prompt_tokens, max_image_pixels=max_pixels)
    say_what_a_bundled_model_is(args.model)
    if args.image is not None:
        session.set_image(args.image)
    return session


def say_what_a_bundled_model_is(name: str) -> None:
    """One line on stderr (the answer stays alone on stdout) about what a bundled model is for."""
    from tinygptv.checkpoint.loading import BUNDLED

    if name in BUNDLED:
        print(f"note: {BUNDLED[name].note}", file=sys.stderr)


def cmd_ask(args) -> int:
    from tinygptv.model.generation import check_utf8

    if args.draw and args.image is None:
        raise ValueError("--draw needs --image")
    check_utf8(args.question, "the question")  # bytes that were not UTF-8 in the argument, before the model loads
    session = _session(args)
    if args.no_stream:
        answer = session.ask(args.question, task=args.task)
        print(answer)
    else:
        answer = session.ask(args.question, task=args.task, on_text=lambda t: print(t, end="", flush=True))
        print()
    if args.draw:
        from tinygptv.serve.draw import draw_boxes

        drawn = draw_boxes(args.image, answer, args.draw)
        print(f"({drawn} box{'es' if drawn != 1 else ''} drawn into {args.draw})", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from tinygptv.serve.chat import run_chat

    run_chat(_session(args), task=args.task)
    return 0


def cmd_info(args) -> int:
    import json

    from tinygptv.config import preset
    from tinygptv.info import format_counts, parameter_counts

    if args.preset:
        config = preset(args.preset)
    else:
        from tinygptv.checkpoint.loading import model_config

        config = model_config(args.model)
    info = parameter_counts(config)
    info["config"] = config.to_dict()
    print(json.dumps(info, indent=2) if args.json else format_counts(info))
    return 0


def cmd_convert(args) -> int:
    from tinygptv.checkpoint.official import convert_official

    convert_official(
        args.official_ckpt, args.phi2, args.eva, args.blip2, args.out,
        stage=args.stage, image_size=args.image_size, vit_heads=args.vit_heads, vit_depth=args.vit_depth,
        qformer_heads=args.qformer_heads, lora_alpha=args.lora_alpha, overwrite=args.overwrite,
    )
    return 0


def cmd_train(args) -> int:
    from tinygptv.train.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        import json

        from tinygptv.train.plan import format_plan, plan_memory

        plan = plan_memory(recipe)
        print(json.dumps(plan, indent=2) if args.json else format_plan(plan, args.card_gb))
        return 0
    import torch

    from tinygptv.train.loop import Trainer
    from tinygptv.train.run_dir import check_run_dir

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    check_run_dir(recipe.output_dir, overwrite=args.overwrite)  # before the model loads: nothing written yet
    trainer = Trainer(recipe, resume=None if args.resume == "none" else args.resume)
    try:
        trainer.train(max_steps=args.max_steps)
    except KeyboardInterrupt:
        print(f"\ntinygptv train: interrupted at step {trainer.step}; the same command resumes from the last "
              f"checkpoint in {recipe.output_dir} (every {recipe.save_every or recipe.schedule.iters_per_epoch} "
              "steps)", file=sys.stderr)
        return 130
    return 0


def cmd_export(args) -> int:
    from tinygptv.checkpoint.native import keep_differing, load_pretrained, save_pretrained
    from tinygptv.checkpoint.loading import resolve_name

    model = load_pretrained(resolve_name(args.model))
    if args.merge_lora:
        model.merge_lora()
    if args.overlay_on:
        kept = keep_differing(model, args.overlay_on)
        save_pretrained(model, args.out, trainable_only=True, base_model=args.overlay_on, overwrite=args.overwrite)
        print(f"wrote {args.out}: {kept:,} parameters that differ from {args.overlay_on}")
        return 0
    save_pretrained(model, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out} (self-contained{', LoRA merged' if args.merge_lora else ''})")
    return 0


# --- the parser ------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinygptv",
        description="TinyGPT-V: a small multimodal LLM (EVA ViT-g + Q-Former + Phi-2) that runs on a CPU.",
        **examples('tinygptv ask --image examples/red_circle.png --task vqa "What color is the shape?"',
                   "tinygptv COMMAND --help"),
    )
    parser.add_argument("--version", action="version", version=versions())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = subcommand(sub, "ask", "answer one question about an image",
                   "Answer one question about an image and print the answer as it is generated.",
                   'tinygptv ask --image examples/red_circle.png --task vqa "What color is the shape?"',
                   'tinygptv ask --image scene.png --task grounding "Describe the image." --draw boxes.png')
    p.add_argument("question", help="the question (in quotes)")
    p.add_argument("--image", help="image file (PNG, JPEG, ...); without it the question is text-only")
    p.add_argument("--no-stream", action="store_true", help="print the answer only when it is complete")
    p.add_argument("--draw", metavar="OUT.png", help="draw the boxes of a grounding answer ({<x1><y1><x2><y2>}, "
                                                      "with <p>phrase</p> labels) onto the image and save it")
    add_model_args(p)
    add_input_limit_args(p)
    p.set_defaults(func=cmd_ask)

    p = subcommand(sub, "chat", "multi-turn conversation about an image",
                   "Interactive chat. Type a question; /image PATH loads another image (and starts a new "
                   "conversation), /reset forgets the conversation, /quit ends.",
                   "tinygptv chat --image examples/red_circle.png --task vqa")
    p.add_argument("--image", help="image to start with")
    add_model_args(p)
    add_input_limit_args(p)
    p.set_defaults(func=cmd_chat)

    p = subcommand(sub, "info", "parameter counts per component",
                   "Parameter counts per component, computed without allocating the weights.",
                   "tinygptv info --preset tinygptv-stage4", "tinygptv info --model tinygptv-nano --json")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=PRESETS.names(), help="a preset configuration")
    src.add_argument("--model", help="a model folder or Hub id (reads its config.json only)")
    p.add_argument("--json", action="store_true", help="print JSON (with the full config)")
    p.set_defaults(func=cmd_info)

    p = subcommand(
        sub, "convert", "convert the official TinyGPT-V release into our format",
        "Build our model folder from an official TinyGPT-V_for_StageN.pth, a Phi-2 folder (the transformers-4.36 "
        "layout or today's microsoft/phi-2), LAVIS eva_vit_g.pth and blip2_pretrained_flant5xxl.pth. Every tensor "
        "of every file is used or reported as skipped on purpose; anything else is an error that names it. Sizes "
        "are read from the files; what no shape shows (head counts, the EVA blocks kept, LoRA alpha) defaults to "
        "the release's values, so files of other sizes need --vit-heads / --vit-depth / --qformer-heads. "
        "`tinygptv fetch --stage N` downloads the release and runs this for you.",
        "tinygptv convert --official-ckpt TinyGPT-V_for_Stage3.pth --phi2 phi-2/ --eva eva_vit_g.pth "
        "--blip2 blip2_pretrained_flant5xxl.pth --out models/tinygptv-stage3")
    p.add_argument("--official-ckpt", required=True, type=Path, metavar="PTH",
                   help="the official checkpoint, TinyGPT-V_for_Stage{1,2,3,4}.pth")
    p.add_argument("--phi2", required=True, type=Path, help="Phi-2 folder (config.json, weights, tokenizer)")
    p.add_argument("--eva", required=True, type=Path, help="EVA-CLIP ViT-g weights, eva_vit_g.pth")
    p.add_argument("--blip2", required=True, type=Path, help="BLIP-2 weights, blip2_pretrained_flant5xxl.pth")
    p.add_argument("--out", required=True, type=Path, help="output model folder (created or replaced)")
    p.add_argument("--stage", type=int, choices=(1, 2, 3, 4), help="which stage the checkpoint is (sets image size "
                                                                  "and template; read from the file when possible)")
    p.add_argument("--image-size", type=int, help="override the image size (224 for stages 1-3, 448 for stage 4)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --out even if it holds files convert did not write (they are kept)")
    # What no tensor shape reveals. The defaults are the release's derivations, right for the real files only.
    p.add_argument("--vit-heads", type=int, help="EVA ViT attention heads (default: width / 88, as LAVIS builds "
                                                 "it: 16 for EVA-g's 1408)")
    p.add_argument("--vit-depth", type=int, help="EVA blocks to keep (default: all but the last, as TinyGPT-V uses "
                                                 "39 of eva_vit_g.pth's 40)")
    p.add_argument("--qformer-heads", type=int, help="Q-Former attention heads (default: width / 64, BERT-base's "
                                                     "12 for 768)")
    p.add_argument("--lora-alpha", type=int, help="LoRA alpha (default: the checkpoint's run config, else 16 as "
                                                  "every official config)")
    p.set_defaults(func=cmd_convert)

    p = subcommand(
        sub, "train", "train a stage from a recipe file",
        "Train from a recipe (configs/*.yaml): the model to start from, datasets and sample ratios, schedule, and "
        "which components train. Overrides are key.path=value (e.g. schedule.init_lr=3e-5 "
        "datasets.0.batch_size=2). Checkpoints go to output_dir; an interrupted run continues from its last "
        "checkpoint. Under torchrun the same command trains with DDP, or FSDP with distributed=fsdp "
        "(docs/training.md).",
        "tinygptv train configs/finetune_nano.yaml --dry-run",
        "torchrun --standalone --nproc_per_node=4 -m tinygptv.cli train configs/tinygptv_stage3.yaml distributed=fsdp")
    p.add_argument("recipe", type=Path, help="recipe file (YAML)")
    p.add_argument("overrides", nargs="*", help="key.path=value changes to the recipe")
    p.add_argument("--dry-run", action="store_true", help="print the expected GPU memory and exit")
    p.add_argument("--json", action="store_true", help="with --dry-run: print JSON")
    p.add_argument("--card-gb", type=float, default=24.0, help="with --dry-run: GPU size to compare against "
                                                               "(default: 24)")
    p.add_argument("--resume", default="auto",
                   help="'auto' (default: the last checkpoint in output_dir, if any), a checkpoint folder, or 'none'")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many more steps (default: run to "
                                                               "the recipe's end)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice, one per core); on a machine other jobs "
                        "share, 1 avoids threads stalling on each other")
    p.add_argument("--overwrite", action="store_true",
                   help="train into output_dir even if it holds files a run does not write (they are kept); a run "
                        "folder of ours needs no flag: the run resumes there")
    p.set_defaults(func=cmd_train)

    p = subcommand(
        sub, "export", "write a self-contained copy of a model, optionally with LoRA merged",
        "Resolve a model folder (a training checkpoint that stores only its trained weights, a folder of ours, a "
        "Hub id) into one self-contained folder. --merge-lora folds the LoRA deltas into the LLM weights: the same "
        "answers, no adapter at inference.",
        "tinygptv export runs/finetune_nano/final --out models/my-model --merge-lora")
    p.add_argument("model", help="a model folder of ours, a training checkpoint's model folder, or a Hub id")
    p.add_argument("--out", required=True, type=Path, help="output model folder (created or replaced)")
    p.add_argument("--merge-lora", action="store_true",
                   help="fold LoRA into the LLM weights (the same answers, no adapter at inference)")
    p.add_argument("--overlay-on", metavar="BASE",
                   help="store only the weights that differ from BASE (a folder, a Hub id, or 'backbones' for the "
                        "packages the nano model is built from) and record BASE as the folder's base")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --out even if it holds files export did not write (they are kept)")
    p.set_defaults(func=cmd_export)

    add_eval_parser(sub)
    add_serve_parser(sub)
    add_demo_parser(sub)
    add_quantize_parser(sub)
    add_bench_parser(sub)
    add_fetch_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"\ntinygptv {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, OSError) as e:  # a user's input or environment: one line, not a traceback
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"tinygptv {args.command}: error: {error_message(e)}", file=sys.stderr)
        return 2


def error_message(e: BaseException) -> str:
    """One line, always: some libraries' messages (torch's weights_only refusal) run over several."""
    if isinstance(e, KeyError) and e.args:
        text = str(e.args[0])
    elif isinstance(e, OSError) and e.filename is not None and str(e.filename) not in str(e):
        text = f"{e.filename}: {e.strerror or e}"
    else:
        text = str(e)
    return " ".join(text.split())


def run() -> None:
    """The `tinygptv` command (and `python -m tinygptv.cli`). Python's last garbage collections at exit walk every
    object torch and transformers created: 1.0-1.2 s of a 6 s cold `ask` here, after the answer is printed. Frozen
    objects are skipped; atexit handlers and the flushing of open files still run. Not in main(), which tests and
    scripts call in a process that goes on."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
