# The training loop every stage shares: AdamW with LAVIS's decay rule, warm-up + cosine by global step, one dataset
# per step, gradient accumulation, optional clipping, mixed precision, checkpoints that resume the same run.
# Data path: recipe -> start model + MixedBatches -> [this loop] -> checkpoints in output_dir.
from __future__ import annotations

import contextlib
import json
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from tinygptv.checkpoint.native import collect_state, save_pretrained
from tinygptv.data.datasets import DATASETS
from tinygptv.data.image_processor import ImageProcessor
from tinygptv.data.templates import TEMPLATES
from tinygptv.train import distributed
from tinygptv.train.batches import Batch, MixedBatches, PromptRenderer
from tinygptv.train.checkpointing import (
    list_checkpoints, load_trainer_state, portable_base, restore_rng, save_checkpoint,
)
from tinygptv.train.recipe import Recipe, recipe_dict
from tinygptv.train.schedule import learning_rate
from tinygptv.train.start import build_start_model
from tinygptv.train.tune import apply_tune, build_optimizer


def pick_precision(recipe: Recipe, device: torch.device) -> str:
    if recipe.precision != "auto":
        if recipe.precision == "fp16" and device.type != "cuda":
            raise ValueError("precision fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
        return recipe.precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


class Trainer:
    def __init__(self, recipe: Recipe, resume: str | None = "auto"):
        self.recipe = recipe
        self.dist = distributed.setup()
        self.device = self.dist.device
        if self.device.type == "cpu":
            # Denormal floats make CPU kernels (exp in SiLU/GELU, above all) orders of magnitude slower: measured
            # 2 s -> 35 s per step once training produced them. Flushing them to zero changes nothing that matters.
            torch.set_flush_denormal(True)
        torch.manual_seed(recipe.seed + self.dist.rank)
        random.seed(recipe.seed + self.dist.rank)
        self.run_dir = Path(recipe.output_dir)
        self.model, base = build_start_model(recipe)
        self.model.to(self.device)
        self.groups = apply_tune(self.model, recipe.tune)
        self.precision = pick_precision(recipe, self.device)
        if self.precision in ("bf16", "fp16") and self.device.type == "cuda":
            self._cast_frozen(torch.bfloat16 if self.precision == "bf16" else torch.float16)
        if recipe.gradient_checkpointing:
            self.model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.optimizer = build_optimizer(self.groups, recipe.schedule.weight_decay, recipe.tune.lr_scale)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.stream = self._build_stream()
        self.step = 0
        self.base = base
        self.wrapped = distributed.wrap(self.model, self.dist, recipe.distributed)
        self._writers = None
        self._vision_cache: dict[str, torch.Tensor] = {}
        if resume:
            self._maybe_resume(resume)
        if self.base is None:
            self.base = self._save_base()

    # --- set-up -----------------------------------------------------------------------------------------------------

    def _cast_frozen(self, dtype: torch.dtype) -> None:
        """Frozen weights in half precision, trainable ones (projections, norms, LoRA) kept in fp32, as the official
        code keeps its trainable norms in fp32 for the grad scaler. The Q-Former stays fp32 unless it trains."""
        for name, param in self.model.named_parameters():
            if not param.requires_grad and not name.startswith("connector."):
                param.data = param.data.to(dtype)

    def _build_stream(self) -> MixedBatches:
        r, cfg = self.recipe, self.model.config
        datasets, ratios, sizes = {}, {}, {}
        for entry in r.datasets:
            key = entry.name if entry.name not in datasets else f"{entry.name}#{len(datasets)}"
            datasets[key] = DATASETS[entry.name](**{"seed": r.seed, **entry.args})
            ratios[key], sizes[key] = entry.sample_ratio, entry.batch_size
        separator = r.turn_separator if r.turn_separator is not None else (self.model.tokenizer.eos_token or "")
        renderer = PromptRenderer(TEMPLATES[cfg.prompt.template], cfg.prompt.end_sym, r.image_prompt, separator,
                                  r.instruction_suffix)
        return MixedBatches(datasets, ratios, sizes, ImageProcessor(cfg.vision), renderer, seed=r.seed,
                            skip_bad=r.on_bad_record == "skip", rank=self.dist.rank,
                            world_size=self.dist.world_size)

    def _save_base(self) -> str:
        """A start model whose frozen weights exist nowhere else (a random preset) is saved once, in full."""
        base = self.run_dir / "base"
        if self.dist.is_main and not (base / "config.json").is_file():
            save_pretrained(self.model, base)
        distributed.barrier(self.dist)
        return str(base)

    def _maybe_resume(self, resume: str) -> None:
        if resume == "auto":
            found = list_checkpoints(self.run_dir)
            if not found:
                return
            checkpoint = found[-1]
        else:
            checkpoint = Path(resume)
        state = load_trainer_state(checkpoint)
        _, weights = collect_state(checkpoint / "model")
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        missing = trainable - set(weights)
        if missing:
            raise ValueError(f"{checkpoint}: trainable weights missing: {sorted(missing)[:8]}")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name in trainable:
                params[name].copy_(weights[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.stream.load_state_dict(state["data"])
        self.step = state["step"]
        self.base = state["base"]
        restore_rng(state["rng"])
        if self.dist.is_main:
            print(f"resumed from {checkpoint} at step {self.step}", file=sys.stderr)

    # --- the loop ---------------------------------------------------------------------------------------------------

    def _vision_tokens(self, batch: Batch) -> torch.Tensor:
        """The frozen tower's output for the batch's images, from the cache where it has them."""
        pixels = batch.pixel_values.to(self.device)
        if not (self.recipe.cache_vision_features and self.recipe.tune.vision == "frozen"):
            return self.model.visual_encoder(pixels)
        todo = [i for i, key in enumerate(batch.image_keys) if key is None or key not in self._vision_cache]
        fresh: dict[int, torch.Tensor] = {}
        if todo:
            with torch.no_grad():
                # rounded to bf16 whether or not it was cached, so a resumed run (empty cache) sees the same values
                fresh = dict(zip(todo, self.model.visual_encoder(pixels[todo]).to(torch.bfloat16)))
            for i in todo:
                if batch.image_keys[i] is not None:
                    self._vision_cache[batch.image_keys[i]] = fresh[i]
        rows = [fresh[i] if i in fresh else self._vision_cache[key] for i, key in enumerate(batch.image_keys)]
        return torch.stack(rows).float()

    def _loss(self, batch: Batch) -> torch.Tensor:
        embeds = None
        if batch.pixel_values is not None:
            encoded = iter(self.model.embed_vision_tokens(self._vision_tokens(batch)))
            embeds = [next(encoded) if has else None for has in batch.has_image]
        out = self.wrapped(None, batch.prompts, batch.answers, image_embeds=embeds)
        return out.loss

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _set_modes(self) -> None:
        """Train mode for what trains (LLM dropout as in the official runs); frozen towers stay in eval mode."""
        self.model.train()
        if self.recipe.tune.vision == "frozen":
            self.model.visual_encoder.eval()
        if self.recipe.tune.qformer == "frozen":
            self.model.connector.eval()

    def train(self, max_steps: int | None = None) -> dict:
        """Runs to the recipe's last step (or max_steps more, for tests and quick looks). Returns a summary."""
        r = self.recipe
        total = r.total_steps
        stop = total if max_steps is None else min(total, self.step + max_steps)
        self._set_modes()
        bar = tqdm(total=total, initial=self.step, disable=not self.dist.is_main, desc="train", unit="step",
                   dynamic_ncols=True)
        losses: list[tuple[int, float]] = []
        per_epoch = r.save_every or r.schedule.iters_per_epoch
        while self.step < stop:
            started = time.perf_counter()
            lr = learning_rate(r.schedule, self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            step_loss, samples = 0.0, 0
            for _ in range(r.accum_grad_steps):
                batch = self.stream.next_batch()
                with self._autocast():
                    loss = self._loss(batch) / r.accum_grad_steps
                self.scaler.scale(loss).backward()
                step_loss += loss.item()
                samples += len(batch) * self.dist.world_size
            if r.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_([p for g in self.groups.values() for _, p in g], r.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            step_loss = distributed.mean(step_loss, self.dist)
            losses.append((self.step, step_loss))
            rate = samples / max(1e-9, time.perf_counter() - started)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
            self._log(step_loss, lr, rate)
            if self.step % per_epoch == 0 or self.step == total:
                self.save()
        bar.close()
        skipped = dict(self.stream.state.skipped)
        if self.dist.is_main and skipped:
            print(f"skipped bad records: {skipped}", file=sys.stderr)
        if self.step >= total:
            self.save_final()
        return {"step": self.step, "losses": losses, "skipped": skipped}

    def _log(self, loss: float, lr: float, rate: float) -> None:
        if not self.dist.is_main or self.step % max(1, self.recipe.log_every) and self.step != 1:
            return
        if self._writers is None:
            self._writers = []
            if self.recipe.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._writers.append(("tb", SummaryWriter(str(self.run_dir / "tensorboard"))))
            if self.recipe.wandb:
                import wandb  # only when asked for

                wandb.init(project=self.recipe.wandb_project, config=recipe_dict(self.recipe))
                self._writers.append(("wandb", wandb))
        for kind, writer in self._writers:
            if kind == "tb":
                writer.add_scalar("train/loss", loss, self.step)
                writer.add_scalar("train/lr", lr, self.step)
                writer.add_scalar("train/samples_per_s", rate, self.step)
                writer.flush()
            else:
                writer.log({"train/loss": loss, "train/lr": lr, "train/samples_per_s": rate}, step=self.step)

    # --- saving -----------------------------------------------------------------------------------------------------

    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "data": self.stream.state_dict(),
            "base": self.base,
            "recipe": json.dumps(recipe_dict(self.recipe)),
        }

    def save(self) -> Path | None:
        path = None
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            path = save_checkpoint(self.run_dir, self.step, self.model, self.base, self.trainer_state(),
                                   self.recipe.keep_checkpoints)
        distributed.barrier(self.dist)
        return path

    def save_final(self) -> None:
        if self.dist.is_main:
            final = self.run_dir / "final"
            save_pretrained(self.model, final, trainable_only=True, base_model=portable_base(self.base, final))
            (self.run_dir / "recipe.json").write_text(json.dumps(recipe_dict(self.recipe), indent=2) + "\n")
            print(f"final model: {final}", file=sys.stderr)
        distributed.barrier(self.dist)
