# Our checkpoint format: a folder with config.json (TinyGPTVConfig), model.safetensors and the tokenizer files.
# A folder may hold only the trainable weights and name its base (config.base_model). Written atomically.
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file

from tinygptv.atomic import save_weights, staging_dir
from tinygptv.checkpoint.backbones import BACKBONES_BASE, backbone_state
from tinygptv.checkpoint.hub import resolve_model_dir
from tinygptv.config import TinyGPTVConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    pass


MODEL_CARD = "README.md"


def save_pretrained(model, directory: str | os.PathLike, *, trainable_only: bool = False,
                    base_model: str | None = None, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write to a temporary sibling folder, then swap it in: a crash never leaves a folder that looks complete.
    `state` stands in for model.state_dict() where the model's own tensors are shards (a sharded training run
    passes the full weights it gathered onto one process)."""
    directory = Path(directory)
    config = TinyGPTVConfig.from_dict(model.config.to_dict())
    state = model.state_dict() if state is None else state
    if trainable_only:
        base = base_model or config.base_model
        if not base:
            raise ValueError("trainable_only=True needs base_model: the folder or Hub id holding the other weights")
        config.base_model = str(base)
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in keep}
    else:
        config.base_model = None
    tmp = staging_dir(directory)
    try:
        save_weights(state, tmp / WEIGHTS_NAME, metadata={"format": "pt", "producer": "tinygptv"})
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)
        card = directory / MODEL_CARD
        if card.is_file():  # the user's writing about the model: a re-export must not delete it
            shutil.copy2(card, tmp / MODEL_CARD)
        config.save(tmp / CONFIG_NAME)  # written last: its presence marks a complete folder
        swap_in(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def swap_in(tmp: Path, directory: Path) -> None:
    """Replace `directory` by the finished folder `tmp` with renames only."""
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_state(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {WEIGHTS_NAME}")
    return load_file(path)


def collect_state(directory: Path, depth: int = 0) -> tuple[TinyGPTVConfig, dict[str, torch.Tensor]]:
    """Config of this folder plus the weights of its chain of bases (base first, then each overlay)."""
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME}; is this a tinygptv model folder?")
    config = TinyGPTVConfig.load(config_path)
    state: dict[str, torch.Tensor] = {}
    if config.base_model == BACKBONES_BASE:  # frozen weights from the installed backbone packages (nano models)
        state = backbone_state(config)
    elif config.base_model:
        if depth > 8:
            raise CheckpointError(f"{directory}: base_model chain deeper than 8 (a cycle?)")
        base = directory / config.base_model  # a relative base is relative to this folder, so runs can move
        _, state = collect_state(base if base.is_dir() else resolve_model_dir(config.base_model), depth + 1)
    state.update(align_lora_names(load_state(directory), state.keys()))
    return config, state


def align_lora_names(state: Mapping[str, torch.Tensor], expected) -> dict[str, torch.Tensor]:
    """peft renames a wrapped Linear's weight X.weight -> X.base_layer.weight. Map between the two forms so a base
    saved without LoRA loads into a model with LoRA and back."""
    expected = set(expected)
    out = {}
    for key, value in state.items():
        if key not in expected:
            if ".base_layer." in key and key.replace(".base_layer.", ".") in expected:
                key = key.replace(".base_layer.", ".")
            else:
                head, _, leaf = key.rpartition(".")
                if f"{head}.base_layer.{leaf}" in expected:
                    key = f"{head}.base_layer.{leaf}"
        out[key] = value
    return out


def load_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict load into a model built on the meta device (tensors are assigned, not copied), naming every missing,
    unexpected or mis-shaped key."""
    expected = model.state_dict()
    state = align_lora_names(state, expected.keys())
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes ({len(wrong)}): {_preview(wrong)}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    cast = {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    materialize_buffers(model)


def materialize_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers (the rotary inverse frequencies) are not in any file; after a meta-device build they
    are recomputed by building that small module again on the CPU."""
    for module in model.modules():
        meta = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if not meta:
            continue
        if not hasattr(module, "config"):
            raise CheckpointError(f"cannot rebuild buffers {meta} of {type(module).__name__}")
        with torch.device("cpu"):
            fresh = type(module)(module.config)
        for n in meta:
            setattr(module, n, getattr(fresh, n))


def _preview(keys: list[str], n: int = 12) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... and {len(keys) - n} more" if len(keys) > n else "")


def keep_differing(model, base_model: str) -> int:
    """Mark trainable exactly the parameters whose values differ from base_model's, so a trainable-only save keeps
    just those. Returns how many parameter values that is."""
    if base_model == BACKBONES_BASE:
        base = backbone_state(model.config)
    else:
        _, base = collect_state(resolve_model_dir(base_model))
    base = align_lora_names(base, dict(model.named_parameters()).keys())
    kept = 0
    for name, param in model.named_parameters():
        same = name in base and base[name].shape == param.shape and torch.equal(base[name].to(param.dtype), param)
        param.requires_grad_(not same)
        kept += 0 if same else param.numel()
    return kept
