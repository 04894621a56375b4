# Training checkpoints: the trainable weights in our format (safetensors, overlaying the run's base) plus optimizer,
# scaler, data and RNG state, written into a temporary folder and renamed into place, so a kill never leaves a
# checkpoint that looks complete. Sits beside the loop: loop state <-> run_dir/checkpoint-NNNNNNN/.
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch

from tinygptv.atomic import writing_dir
from tinygptv.checkpoint.native import save_pretrained

PREFIX = "checkpoint-"
STATE_NAME = "trainer_state.pt"
CHECKPOINT_ENTRIES = ("model", STATE_NAME)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"{PREFIX}{step:07d}"


def save_checkpoint(run_dir: Path, step: int, model, base_model: str, trainer_state: dict, keep: int) -> Path:
    final = checkpoint_dir(run_dir, step)
    with writing_dir(final, lambda name: name in CHECKPOINT_ENTRIES, what="training checkpoint") as tmp:
        save_pretrained(model, tmp / "model", trainable_only=True, base_model=portable_base(base_model, final / "model"))
        torch.save({**trainer_state, "rng": rng_state()}, tmp / STATE_NAME)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def portable_base(base_model: str, model_dir: Path) -> str:
    """A base that is a folder is recorded relative to the checkpoint, so a run folder can be moved whole."""
    path = Path(base_model)
    if path.is_dir():
        return os.path.relpath(path.resolve(), model_dir.resolve())
    return base_model


def list_checkpoints(run_dir: Path) -> list[Path]:
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and (p / STATE_NAME).is_file())


def load_trainer_state(checkpoint: Path) -> dict:
    path = checkpoint / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint}: no {STATE_NAME}; not a training checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
