# Training checkpoints: the trainable weights in our format (safetensors, overlaying the run's base) plus optimizer
# (keyed by parameter name), scaler, data and RNG state, written into a temporary folder and renamed into place, so a
# kill never leaves a checkpoint that looks complete. One format for one process and for many (sharded or not): the
# loop gathers the full state onto the first process first. Sits beside the loop: loop state <-> run_dir/checkpoint-N/.
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch

from tinygptv.atomic import clean_stale_in, writing_dir
from tinygptv.checkpoint.native import load_state, read_pth, save_pretrained

PREFIX = "checkpoint-"
STATE_NAME = "trainer_state.pt"
MODEL_DIR = "model"
CHECKPOINT_ENTRIES = (MODEL_DIR, STATE_NAME)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"{PREFIX}{step:07d}"


def save_checkpoint(run_dir: Path, step: int, model, base_model: str, weights: dict, trainer_state: dict,
                    keep: int) -> Path:
    """`weights` are the trained weights by name (gathered from the shards under FSDP); `trainer_state` holds the
    optimizer, scaler, data and RNG state."""
    final = checkpoint_dir(run_dir, step)
    with writing_dir(final, lambda name: name in CHECKPOINT_ENTRIES, what="training checkpoint") as tmp:
        save_trainable(model, tmp / MODEL_DIR, base_model, weights, portable_to=final / MODEL_DIR)
        torch.save(trainer_state, tmp / STATE_NAME)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_trainable(model, directory: Path, base_model: str, weights: dict, portable_to: Path | None = None) -> None:
    """A model folder with only the trained weights, naming the base that holds the rest (relative to where the folder
    ends up, `portable_to`, when that differs from where it is written)."""
    base = portable_base(base_model, portable_to or directory)
    save_pretrained(model, directory, trainable_only=True, base_model=base, state=weights)


def load_trainable_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The trained weights a checkpoint holds (its own file only: the base's frozen weights are already loaded)."""
    return load_state(checkpoint / MODEL_DIR)


def remove_unfinished(run_dir: Path) -> None:
    """Staging folders of checkpoints whose writer was killed: never complete, never read, only taking space."""
    clean_stale_in(run_dir)


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
    return read_pth(path, "training state")


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
