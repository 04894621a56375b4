# The `tinygptv` command: one subcommand per way of using the data path (ask/chat run it, info describes it,
# convert fills it with the official weights). Each subcommand's --help says what it does and how.
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tinygptv.data.templates import TASK_TAGS, TEMPLATES

def _add_model_args(p: argparse.ArgumentParser) -> None:
    from tinygptv.serve.loading import DEFAULT_MODEL, add_precision_args

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="a model folder in our format, a Hugging Face Hub id, or a preset name (random weights); "
                        f"default: {DEFAULT_MODEL}")
    add_precision_args(p)
    p.add_argument("--template", choices=TEMPLATES.names(), default=None,
                   help="prompt template (default: the one the model was trained with)")
    p.add_argument("--task", choices=TASK_TAGS, default=None, help="prepend a stage-4 task tag such as [vqa]")
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=None, help="sample with this temperature (default: greedy)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold when sampling")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width (1 = no beam search)")
    p.add_argument("--repetition-penalty", type=float, default=1.0)


def _generate_kwargs(args) -> dict:
    sampling = args.temperature is not None
    return dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=sampling,
        temperature=args.temperature if sampling else 1.0,
        top_p=args.top_p,
        num_beams=args.num_beams,
        repetition_penalty=args.repetition_penalty,
    )


def _session(args):
    from tinygptv.serve.chat import ChatSession
    from tinygptv.serve.loading import load_for_args

    return ChatSession(load_for_args(args), template=args.template, **_generate_kwargs(args))


def cmd_ask(args) -> int:
    if args.image is not None:
        _check_image(args.image)
    session = _session(args)
    if args.image is not None:
        session.set_image(args.image)
    if args.no_stream:
        answer = session.ask(args.question, task=args.task)
        print(answer)
    else:
        answer = session.ask(args.question, task=args.task, on_text=lambda t: print(t, end="", flush=True))
        print()
    if args.draw:
        if args.image is None:
            raise ValueError("--draw needs --image")
        from tinygptv.serve.draw import draw_boxes

        drawn = draw_boxes(args.image, answer, args.draw)
        print(f"({drawn} box{'es' if drawn != 1 else ''} drawn into {args.draw})", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from tinygptv.serve.chat import run_chat

    if args.image is not None:
        _check_image(args.image)
    session = _session(args)
    if args.image is not None:
        session.set_image(args.image)
    run_chat(session, task=args.task)
    return 0


def _check_image(path: str) -> None:
    """Fail before loading a model, with the file's name, when the image cannot be used."""
    from tinygptv.data.image_processor import open_image

    open_image(path)


def cmd_info(args) -> int:
    from tinygptv.config import TinyGPTVConfig, preset
    from tinygptv.info import format_counts, parameter_counts

    if args.preset:
        config = preset(args.preset)
    else:
        from tinygptv.checkpoint.hub import resolve_model_dir

        config = TinyGPTVConfig.load(resolve_model_dir(args.model) / "config.json")
    info = parameter_counts(config)
    info["config"] = config.to_dict()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_counts(info))
    return 0


def cmd_convert(args) -> int:
    from tinygptv.checkpoint.official import convert_official

    convert_official(
        args.official_ckpt, args.phi2, args.eva, args.blip2, args.out,
        stage=args.stage, image_size=args.image_size,
    )
    print(f"wrote {args.out}")
    return 0


def cmd_train(args) -> int:
    from tinygptv.train.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        from tinygptv.train.plan import format_plan, plan_memory

        plan = plan_memory(recipe)
        print(json.dumps(plan, indent=2) if args.json else format_plan(plan, args.card_gb))
        return 0
    from tinygptv.train.loop import Trainer

    trainer = Trainer(recipe, resume=None if args.resume == "none" else args.resume)
    trainer.train(max_steps=args.max_steps)
    return 0


def cmd_export(args) -> int:
    from tinygptv.model.tinygptv import TinyGPTV

    model = TinyGPTV.from_pretrained(args.model)
    if args.merge_lora:
        model.merge_lora()
    if args.overlay_on:
        from tinygptv.checkpoint.native import keep_differing

        kept = keep_differing(model, args.overlay_on)
        model.save_pretrained(args.out, trainable_only=True, base_model=args.overlay_on)
        print(f"wrote {args.out}: {kept:,} parameters that differ from {args.overlay_on}")
        return 0
    model.save_pretrained(args.out)
    print(f"wrote {args.out} (self-contained{', LoRA merged' if args.merge_lora else ''})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from tinygptv.config import PRESETS

    parser = argparse.ArgumentParser(
        prog="tinygptv",
        description="TinyGPT-V: a small multimodal LLM (EVA ViT-g + Q-Former + Phi-2) that runs on a CPU.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ask", help="answer one question about an image",
                       description="Answer one question about an image and print the answer as it is generated.")
    p.add_argument("question")
    p.add_argument("--image", help="image file (PNG, JPEG, ...); without it the question is text-only")
    p.add_argument("--no-stream", action="store_true", help="print the answer only when it is complete")
    p.add_argument("--draw", metavar="OUT.png", help="draw the boxes of a grounding answer ({<x1><y1><x2><y2>}, "
                                                      "with <p>phrase</p> labels) onto the image and save it")
    _add_model_args(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("chat", help="multi-turn conversation about an image",
                       description="Interactive chat. Type a question; /image PATH loads another image (and starts "
                                   "a new conversation), /reset forgets the conversation, /quit ends.")
    p.add_argument("--image", help="image to start with")
    _add_model_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="parameter counts per component",
                       description="Parameter counts per component, computed without allocating the weights.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=PRESETS.names())
    src.add_argument("--model", help="a model folder or Hub id (reads its config.json only)")
    p.add_argument("--json", action="store_true", help="print JSON (with the full config)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "convert", help="convert the official TinyGPT-V release into our format",
        description="Build our model folder from an official TinyGPT-V_for_StageN.pth, a Phi-2 folder (the "
                    "transformers-4.36 layout or today's microsoft/phi-2), LAVIS eva_vit_g.pth and "
                    "blip2_pretrained_flant5xxl.pth. Every tensor of every file is used or reported as skipped on "
                    "purpose; anything else is an error that names it.")
    p.add_argument("--official-ckpt", required=True, type=Path)
    p.add_argument("--phi2", required=True, type=Path, help="Phi-2 folder (config.json, weights, tokenizer)")
    p.add_argument("--eva", required=True, type=Path, help="eva_vit_g.pth")
    p.add_argument("--blip2", required=True, type=Path, help="blip2_pretrained_flant5xxl.pth")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--stage", type=int, choices=(1, 2, 3, 4), help="which stage the checkpoint is (sets image size "
                                                                  "and template; read from the file when possible)")
    p.add_argument("--image-size", type=int, help="override the image size (224 for stages 1-3, 448 for stage 4)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "train", help="train a stage from a recipe file",
        description="Train from a recipe (configs/*.yaml): the model to start from, datasets and sample ratios, "
                    "schedule, and which components train. Overrides are key.path=value (e.g. "
                    "schedule.init_lr=3e-5 datasets.0.batch_size=2). Checkpoints go to output_dir; an interrupted "
                    "run continues from its last checkpoint. Under torchrun the same command trains with DDP, or "
                    "FSDP with distributed=fsdp (e.g. torchrun --standalone --nproc_per_node=4 -m tinygptv.cli train "
                    "RECIPE distributed=fsdp); docs/training.md.")
    p.add_argument("recipe", type=Path)
    p.add_argument("overrides", nargs="*", help="key.path=value changes to the recipe")
    p.add_argument("--dry-run", action="store_true", help="print the expected GPU memory and exit")
    p.add_argument("--json", action="store_true", help="with --dry-run: print JSON")
    p.add_argument("--card-gb", type=float, default=24.0, help="with --dry-run: GPU size to compare against")
    p.add_argument("--resume", default="auto",
                   help="'auto' (last checkpoint in output_dir, if any), a checkpoint folder, or 'none'")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many more steps")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "export", help="write a self-contained copy of a model, optionally with LoRA merged",
        description="Resolve a model folder (a training checkpoint that stores only its trained weights, a folder "
                    "of ours, a Hub id) into one self-contained folder. --merge-lora folds the LoRA deltas into the "
                    "LLM weights: the same answers, no adapter at inference.")
    p.add_argument("model")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--merge-lora", action="store_true")
    p.add_argument("--overlay-on", metavar="BASE",
                   help="store only the weights that differ from BASE (a folder, a Hub id, or 'backbones' for the "
                        "packages the nano model is built from) and record BASE as the folder's base")
    p.set_defaults(func=cmd_export)

    from tinygptv.bench.cli import add_bench_parser
    from tinygptv.eval.cli import add_eval_parser
    from tinygptv.quant.cli import add_quantize_parser
    from tinygptv.serve.demo_cli import add_demo_parser
    from tinygptv.serve.serve_cli import add_serve_parser

    add_eval_parser(sub)
    add_serve_parser(sub)
    add_demo_parser(sub)
    add_quantize_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (FileNotFoundError, ValueError, KeyError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"tinygptv {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
