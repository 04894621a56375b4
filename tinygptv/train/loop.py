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

from tinygptv.checkpoint.native import save_pretrained
from tinygptv.config import CONFIG_NAME
from tinygptv.data.datasets import DATASETS
from tinygptv.data.image_processor import ImageProcessor
from tinygptv.data.templates import TEMPLATES
from tinygptv.train import distributed
from tinygptv.train.batches import MixedBatches, PromptRenderer
from tinygptv.train.checkpointing import (
    list_checkpoints, load_trainable_weights, load_trainer_state, remove_unfinished, restore_rng, rng_state,
    save_checkpoint, save_trainable,
)
from tinygptv.train.forward import TrainForward
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
        # Every process builds the same start model (FSDP keeps each one's shard of its own copy); then each draws
        # its own dropout masks.
        torch.manual_seed(recipe.seed)
        random.seed(recipe.seed + self.dist.rank)
        self.run_dir = Path(recipe.output_dir)
        self.model, base = build_start_model(recipe)
        if self.dist.rank:
            torch.manual_seed(recipe.seed + self.dist.rank)
        checkpoint = self._find_checkpoint(resume)
        state = load_trainer_state(checkpoint) if checkpoint else None
        self.base = state["base"] if state else base or self._save_base()
        apply_tune(self.model, recipe.tune)
        self.precision = pick_precision(recipe, self.device)
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        if half is not None and self.device.type == "cuda":
            self._cast_frozen(half)
        if recipe.gradient_checkpointing:
            self.model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.sharded = recipe.distributed == "fsdp" and self.dist.enabled
        if not self.sharded:  # FSDP moves each shard to the device itself: no process holds the whole model there
            self.model.to(self.device)
        cache = recipe.cache_vision_features and recipe.tune.vision == "frozen"
        self.forward_pass = TrainForward(self.model, cache_vision=cache, same_modules_everywhere=self.dist.enabled,
                                         sharded=self.sharded)
        self.wrapped = distributed.wrap(self.forward_pass, self.dist, recipe.distributed, half)
        # after wrapping: FSDP has replaced every parameter by its shard
        self.groups = apply_tune(self.model, recipe.tune)
        self.image_path = [p for comp in ("vision", "qformer", "projector") for _, p in self.groups.get(comp, [])]
        self.optimizer = build_optimizer(self.groups, recipe.schedule.weight_decay, recipe.tune.lr_scale)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.stream = self._build_stream()
        self.step = 0
        self._writers = None
        if state:
            self._resume(checkpoint, state)

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
        """A start model whose frozen weights exist nowhere else (a random preset) is saved once, in full (before
        any sharding, while every process still holds the whole model)."""
        base = self.run_dir / "base"
        if self.dist.is_main and not (base / CONFIG_NAME).is_file():
            save_pretrained(self.model, base)
        distributed.barrier(self.dist)
        return str(base)

    def _find_checkpoint(self, resume: str | None) -> Path | None:
        if not resume:
            return None
        if resume != "auto":
            return Path(resume)
        found = list_checkpoints(self.run_dir)
        return found[-1] if found else None

    def _resume(self, checkpoint: Path, state: dict) -> None:
        """Every process reads the checkpoint and keeps its part: the same continuation whether the run was saved by
        one process or many, sharded or not."""
        weights = load_trainable_weights(checkpoint)
        # in the model's order: loading is a collective per tensor under FSDP, so every process must go the same way
        trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        missing = set(trainable) - set(weights)
        if missing:
            raise ValueError(f"{checkpoint}: trainable weights missing: {sorted(missing)[:8]}")
        optim = state["optimizer"]
        # checkpoints written before the optimizer state was keyed by parameter name hold torch's own layout
        by_index = any(isinstance(p, int) for group in optim["param_groups"] for p in group["params"])
        if by_index and self.sharded:
            raise ValueError(f"{checkpoint}: written before sharded checkpoints (optimizer state by index); "
                             f"resume it on one process or with distributed=ddp")
        distributed.load_trainable(self.model, self.optimizer, {n: weights[n] for n in trainable},
                                   None if by_index else optim)
        if by_index:
            self.optimizer.load_state_dict(optim)
        self.scaler.load_state_dict(state["scaler"])
        self.stream.load_state_dict(state["data"])
        self.step = state["step"]
        per_rank = state.get("rng_ranks")
        if per_rank and len(per_rank) == self.dist.world_size:
            restore_rng(per_rank[self.dist.rank])
        elif self.dist.is_main:
            restore_rng(state["rng"])  # saved by one process, or by another number of them: the others start afresh
        if self.dist.is_main:
            remove_unfinished(self.run_dir)
            print(f"resumed from {checkpoint} at step {self.step}", file=sys.stderr)

    # --- the loop ---------------------------------------------------------------------------------------------------

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
        final = self.run_dir / "final"
        if self.step >= total and (final / CONFIG_NAME).is_file():
            self._say(f"this run already finished (step {self.step} of {total}); its model is {final}. Nothing to "
                      f"do: choose another output_dir, or train on with a larger schedule.")
            return {"step": self.step, "losses": [], "skipped": dict(self.stream.state.skipped)}
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
            step_loss, samples, any_image = 0.0, 0, False
            for i in range(r.accum_grad_steps):
                batch = self.stream.next_batch()
                any_image |= batch.any_image
                with distributed.gradient_sync(self.wrapped, i == r.accum_grad_steps - 1):
                    with self._autocast():
                        loss = self.wrapped(batch) / r.accum_grad_steps
                    self.scaler.scale(loss).backward()
                step_loss += loss.item()
                samples += len(batch) * self.dist.world_size
            if not any_image:
                # Only blank images (weight 0) went through the image path: one process would have left its weights
                # without a gradient, and AdamW skips such a weight (no decay, no moment update). Do the same.
                for param in self.image_path:
                    param.grad = None
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
        if skipped:
            self._say(f"skipped bad records: {skipped}")
        if self.step >= total:
            self.save_final()
        else:
            self._say(f"stopped at step {self.step} of {total} (--max-steps); the same command continues from "
                      f"the last checkpoint in {self.run_dir}")
        return {"step": self.step, "losses": losses, "skipped": skipped}

    def _say(self, message: str) -> None:
        if self.dist.is_main:
            print(message, file=sys.stderr, flush=True)

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

    def _gather(self) -> tuple[dict, dict, list | None]:
        """Trained weights, optimizer state and every process's RNG state, on the first process. Every process takes
        part (under FSDP the weights are shards)."""
        weights, optim = distributed.gather_trainable(self.model, self.optimizer)
        return weights, optim, distributed.gather_objects(rng_state(), self.dist)

    def save(self) -> Path | None:
        weights, optim, rngs = self._gather()
        path = None
        if self.dist.is_main:
            state = {
                "step": self.step,
                "optimizer": optim,
                "scaler": self.scaler.state_dict(),
                "data": self.stream.state_dict(),
                "base": self.base,
                "recipe": json.dumps(recipe_dict(self.recipe)),
                "rng": rngs[0],
            }
            if self.dist.enabled:
                state["rng_ranks"] = rngs
            path = save_checkpoint(self.run_dir, self.step, self.model, self.base, weights, state,
                                   self.recipe.keep_checkpoints)
        distributed.barrier(self.dist)
        return path

    def save_final(self) -> None:
        weights, _, _ = self._gather()
        if self.dist.is_main:
            final = self.run_dir / "final"
            save_trainable(self.model, final, self.base, weights)
            (self.run_dir / "recipe.json").write_text(json.dumps(recipe_dict(self.recipe), indent=2) + "\n")
            print(f"final model: {final}", file=sys.stderr)
        distributed.barrier(self.dist)
