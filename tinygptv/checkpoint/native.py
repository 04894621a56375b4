# Our checkpoint format: a folder with config.json (TinyGPTVConfig), model.safetensors and the tokenizer files. A folder
# may hold only the trainable weights and name its base (config.base_model). The one place models are read and written.
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer

from tinygptv.atomic import save_weights, writing_dir
from tinygptv.checkpoint.backbones import BACKBONES_BASE, backbone_state
from tinygptv.checkpoint.hub import resolve_model_dir
from tinygptv.config import CONFIG_NAME, WEIGHTS_NAME, TinyGPTVConfig
from tinygptv.engine.store import ENGINE_DIR
from tinygptv.model.lora import merge_lora_into_state
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.model.weights import align_lora_names, cast_weights, materialize_buffers
from tinygptv.quant.apply import prepare_for_quantized_weights

MODEL_CARD = "README.md"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "chat_template.jinja", "chat_template.json")
# Everything a model folder of ours may hold (ENGINE_DIR: its --backend conversions, which a new save drops with the
# weights they came from); anything else is the user's, and no save deletes it.
MODEL_ENTRIES = frozenset((CONFIG_NAME, WEIGHTS_NAME, MODEL_CARD, *TOKENIZER_FILES, ENGINE_DIR))


class CheckpointError(ValueError):
    pass


def is_model_entry(name: str) -> bool:
    return name in MODEL_ENTRIES


def save_pretrained(model: TinyGPTV, directory: str | os.PathLike, *, trainable_only: bool = False,
                    base_model: str | None = None, overwrite: bool = False,
                    state: dict[str, torch.Tensor] | None = None) -> Path:
    """config.json + model.safetensors + tokenizer files, written into a staging folder and swapped in (a crash never
    leaves a folder that looks complete). trainable_only keeps just the weights with requires_grad and records
    base_model, the folder or Hub id that supplies the rest (a relative path is relative to the saved folder). A
    model card (README.md) already in the folder is kept. A folder holding files of someone else is refused unless
    `overwrite`, which writes into it and keeps those files. `state` stands in for model.state_dict() where the
    model's own tensors are shards (a sharded training run passes the full weights it gathered onto one process)."""
    directory = Path(directory)
    with writing_dir(directory, is_model_entry, overwrite=overwrite, what="model folder", marker=CONFIG_NAME) as tmp:
        card = directory / MODEL_CARD
        if card.is_file():  # the user's writing about the model: a re-export must not delete it
            shutil.copy2(card, tmp / MODEL_CARD)
        write_model_files(model, tmp, trainable_only=trainable_only, base_model=base_model, state=state)
    return directory


def write_model_files(model: TinyGPTV, folder: Path, *, trainable_only: bool = False, base_model: str | None = None,
                      state: dict[str, torch.Tensor] | None = None) -> None:
    """The files of a model folder, into `folder` (a staging folder of writing_dir); config.json last."""
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
    save_weights(state, folder / WEIGHTS_NAME, metadata={"format": "pt", "producer": "tinygptv"})
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(folder)
    config.save(folder / CONFIG_NAME)  # written last: its presence marks a complete folder


def load_pretrained(name_or_path: str | os.PathLike, *, revision: str | None = None,
                    dtype: torch.dtype | None = None, engine: dict[str, torch.nn.Module] | None = None,
                    merge_lora: bool = False) -> TinyGPTV:
    """A folder of ours or a Hub id, ready for inference (eval mode, TinyGPT-V's trainable set marked). Built on the
    meta device and filled from the file, so loading never holds a second, randomly initialised copy of the weights.
    A copy saved by `tinygptv quantize` gets its quantized layers before its weights are loaded.

    merge_lora: LoRA folded into the weights as they are read (the model is built without adapter modules; the same
    weights as merging after loading).

    `engine` (an inference engine's parts by attribute name: its vision tower and LM, their tensors on the meta
    device, LoRA merged into the LM) take the place of the config's before anything is read: only the tensors the
    model then has are read (the LM's embedding table; nothing of the tower), so what the engine runs never passes
    through memory in PyTorch form."""
    directory = resolve_model_dir(name_or_path, revision)
    engine = engine or {}
    wanted = {name: {f"{name}.{k}" for k in part.state_dict()} for name, part in engine.items()}

    def keep(key: str) -> bool:
        part = key.split(".", 1)[0]
        return part not in wanted or key in wanted[part]

    config, state = collect_state(directory, keep=keep if engine else None)
    if merge_lora and not engine and config.lora.r > 0:
        state = merge_lora_into_state(state, config.lora)
    if merge_lora or engine:
        config.lora.r = 0
    with torch.device("meta"):
        model = TinyGPTV(config, load_tokenizer(directory))
    for name, part in engine.items():
        setattr(model, name, part)
    if config.quant != "none":
        prepare_for_quantized_weights(model, config.quant)
    elif dtype is not None:
        for k, v in state.items():  # one tensor at a time, so the file's copy is freed as it goes
            if v.is_floating_point():
                state[k] = v.to(dtype)
        cast_weights(model, dtype)
    load_into(model, state, str(directory))
    model.freeze_as_official()
    return model.eval()


def read_pth(path: Path, what: str):
    """A .pth / pickle file read with weights_only=True (a file that would run code is refused, not run); any failure
    is one line naming the file, not torch's page-long explanation."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own text ends by suggesting weights_only=False: not advice to pass on
        raise CheckpointError(f"{what} {path}: holds Python objects other than tensors and weights, which are never "
                              "loaded (unpickling them could run code); it is not a file this command reads") from None
    except Exception as e:  # EOFError, RuntimeError, zipfile errors: a damaged or truncated file
        raise CheckpointError(f"{what} {path}: damaged or not a PyTorch file ({type(e).__name__})") from None


def load_tokenizer(directory: Path):
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    return AutoTokenizer.from_pretrained(str(directory))


def load_state(directory: Path, keep=None) -> dict[str, torch.Tensor]:
    """The folder's weights; with `keep` (name -> bool), only those it accepts are read from the file."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {WEIGHTS_NAME}")
    try:
        if keep is None:
            return load_file(path)
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keep(k)}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot be read as safetensors ({e}); the file is damaged or incomplete, "
                              "write it again") from None


def collect_state(directory: Path, depth: int = 0, keep=None) -> tuple[TinyGPTVConfig, dict[str, torch.Tensor]]:
    """Config of this folder plus the weights of its chain of bases (base first, then each overlay); with `keep`
    (name -> bool), only the weights it accepts."""
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME}; is this a tinygptv model folder?")
    config = TinyGPTVConfig.load(config_path)
    state: dict[str, torch.Tensor] = {}
    if config.base_model == BACKBONES_BASE:  # frozen weights from the installed backbone packages (nano models)
        state = {k: v for k, v in backbone_state(config).items() if keep is None or keep(k)}
    elif config.base_model:
        if depth > 8:
            raise CheckpointError(f"{directory}: base_model chain deeper than 8 (a cycle?)")
        base = directory / config.base_model  # a relative base is relative to this folder, so runs can move
        _, state = collect_state(base if base.is_dir() else resolve_model_dir(config.base_model), depth + 1, keep)
    state.update(align_lora_names(load_state(directory, keep), state.keys()))
    return config, state


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


def _preview(keys: list[str], n: int = 12) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... and {len(keys) - n} more" if len(keys) > n else "")


def keep_differing(model: TinyGPTV, base_model: str) -> int:
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
