# Peak GPU memory and training speed of each stage's recipe at full size, beside the memory planner's estimate: the
# preset with random weights (nothing to download), the recipe's batch and image size, synthetic samples as long as
# the recipe allows, a few optimizer steps through the real training loop; with and without gradient checkpointing,
# fp16 + GradScaler and bf16. Prints a Markdown table (for docs/training.md) and writes it as JSON.
#   python benchmarks/train_memory.py --out runs/train_memory.json              # a CUDA GPU, every stage
#   python benchmarks/train_memory.py --preset tiny --device cpu --steps 1      # smoke check on the CPU
from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def write_samples(folder: Path, count: int, image_size: int, answer_tokens: int, template: str) -> Path:
    """`count` records of the llava_json format: a noise image and an answer of `answer_tokens` bytes, which the
    random presets' byte-level tokenizer makes that many tokens (the loop cuts answers at max_txt_len anyway)."""
    rng = np.random.default_rng(0)
    records = []
    # stages 1-2 train on captions (no instruction); the others on questions of about the planner's prompt length
    question = "<image>\n" + ("?" if template == "none" else "Describe the picture in a few words, please.")
    for i in range(count):
        name = f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)).save(folder / name)
        records.append({"image": name, "conversations": [{"from": "human", "value": question},
                                                         {"from": "gpt", "value": "a" * answer_tokens}]})
    path = folder / "train.json"
    path.write_text(json.dumps(records))
    return path


def stage_recipe(stage: int, preset: str | None, precision: str, checkpointing: bool, run_dir: Path):
    """The stage's recipe, on synthetic samples at its largest batch size, saving nothing."""
    from tinygptv.train.recipe import DatasetEntry, load_recipe

    recipe = load_recipe(ROOT / "configs" / f"tinygptv_stage{stage}.yaml", [
        "model.init_from=null", f"precision={precision}", f"gradient_checkpointing={str(checkpointing).lower()}",
        f"output_dir={run_dir}", "tensorboard=false", "save_every=1000000000", "log_every=1000000000"])
    if preset:
        recipe.model.preset, recipe.model.config, recipe.image_size = preset, {}, None
    batch = max(d.batch_size for d in recipe.datasets)
    recipe.datasets = [DatasetEntry("llava_json", batch_size=batch, args={})]
    return recipe


def build_on(device: torch.device) -> None:
    """Initialise the start model's random weights where they will live: on a GPU that takes seconds, on the CPU
    about a minute per build at full size (the rest of the trainer, data pipeline included, stays as it is)."""
    from tinygptv.train import loop

    build = loop.build_start_model

    def on_device(recipe):
        with torch.device(device):
            return build(recipe)

    loop.build_start_model = on_device


def measure(recipe, device: torch.device, steps: int) -> dict:
    from tinygptv.train.loop import Trainer

    # A random preset's frozen weights are saved once as the run's base (7 GB at full size); the trainer reuses a
    # base that exists, and nothing here reads it, so a placeholder stands in.
    base = Path(recipe.output_dir) / "base"
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text("{}")
    trainer = Trainer(recipe, resume=None)
    trainer.train(max_steps=1)  # warm-up: allocator, kernels, AdamW state
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started, cpu_started = time.perf_counter(), time.process_time()
    trainer.train(max_steps=steps)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    samples = steps * recipe.datasets[0].batch_size * recipe.accum_grad_steps
    out = {"samples_per_s": samples / seconds, "seconds_per_step": seconds / steps}
    if not cuda:  # the work done, all threads together: on a shared CPU steadier than the wall clock
        out["cpu_seconds_per_step"] = (time.process_time() - cpu_started) / steps
    if cuda:
        out.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
    del trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="peak GPU memory and samples/s of each training stage at full size")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--precisions", nargs="+", default=None, help="default: fp16 bf16 on CUDA, fp32 bf16 on CPU")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps measured after one warm-up step")
    parser.add_argument("--preset", default=None, help="another preset than the stage's (tiny: a CPU smoke check)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    from tinygptv.atomic import write_json_atomic
    from tinygptv.train.plan import plan_memory
    from tinygptv.train.start import start_config

    device = torch.device(args.device)
    build_on(device)
    precisions = args.precisions or (["fp16", "bf16"] if device.type == "cuda" else ["fp32", "bf16"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    preset = args.preset or "of each stage"
    print(f"{name}, torch {torch.__version__}, {args.steps} steps after 1 warm-up, preset {preset}")
    print("| stage | image | batch x tokens | precision | checkpointing | planner GiB | peak allocated GiB "
          "| peak reserved GiB | samples/s | CPU s/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            for precision in precisions:
                for checkpointing in (False, True):
                    run_dir = Path(tmp) / f"s{stage}-{precision}-{int(checkpointing)}"
                    recipe = stage_recipe(stage, args.preset, precision, checkpointing, run_dir)
                    plan = plan_memory(recipe)
                    config = start_config(recipe, None)
                    data = run_dir / "data"
                    data.mkdir(parents=True)
                    recipe.datasets[0].args = {"ann_path": str(write_samples(
                        data, recipe.datasets[0].batch_size, config.vision.image_size, config.prompt.max_txt_len,
                        config.prompt.template))}
                    row = {"stage": stage, "image_size": config.vision.image_size,
                           "batch": recipe.datasets[0].batch_size, "sequence_tokens": plan["sequence_tokens"],
                           "precision": precision, "gradient_checkpointing": checkpointing,
                           "planner_gib": plan["total_gb"]["with gradient checkpointing" if checkpointing
                                                          else "without checkpointing"]}
                    try:
                        row.update(measure(recipe, device, args.steps))
                    except torch.OutOfMemoryError:
                        row["error"] = "out of memory"
                        gc.collect()
                        torch.cuda.empty_cache()
                    rows.append(row)
                    cells = [f"{row.get(k):.2f}" if isinstance(row.get(k), float) else str(row.get(k, "n/a"))
                             for k in ("planner_gib", "peak_allocated_gib", "peak_reserved_gib", "samples_per_s",
                                       "cpu_seconds_per_step")]
                    print(f"| {stage} | {row['image_size']} | {row['batch']} x {row['sequence_tokens']} | {precision} "
                          f"| {'on' if checkpointing else 'off'} | " + " | ".join(cells) + " |"
                          + (f" {row['error']}" if "error" in row else ""), flush=True)
    if args.out:
        write_json_atomic(args.out, {"device": name, "torch": torch.__version__, "steps": args.steps, "rows": rows})


if __name__ == "__main__":
    main()
