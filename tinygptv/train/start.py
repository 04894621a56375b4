# The model a recipe starts from: a preset (random, or real backbones), optionally filled with an earlier stage's
# checkpoint, with the recipe's config overrides applied. Carries trained norms across the stage-1 -> stage-2 hand-off
# (the official strict=False load silently dropped them).
from __future__ import annotations

from typing import Any, Mapping

import torch

from tinygptv.checkpoint.backbones import build_from_backbones
from tinygptv.checkpoint.hub import resolve_model_dir
from tinygptv.checkpoint.loading import resolve_name
from tinygptv.checkpoint.native import CheckpointError, collect_state, load_tokenizer
from tinygptv.config import TinyGPTVConfig, preset
from tinygptv.data.tokenizer import byte_level_tokenizer
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.model.vision.eva_vit import interpolate_pos_embed
from tinygptv.model.weights import align_lora_names
from tinygptv.train.recipe import Recipe


def deep_update(base: dict, changes: Mapping[str, Any]) -> dict:
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def start_config(recipe: Recipe, base: TinyGPTVConfig | None) -> TinyGPTVConfig:
    src = recipe.model
    data = preset(src.preset).to_dict() if src.preset else base.to_dict()
    deep_update(data, src.config)
    prompt = data["prompt"]
    for key in ("template", "end_sym", "max_txt_len"):
        if getattr(recipe, key) is not None:
            prompt[key] = getattr(recipe, key)
    if recipe.image_size is not None:
        data["vision"]["image_size"] = recipe.image_size
    data["base_model"] = None
    return TinyGPTVConfig.from_dict(data)


def build_start_model(recipe: Recipe) -> tuple[TinyGPTV, str | None]:
    """Returns the model and the reference its frozen weights can be rebuilt from (None: they must be saved)."""
    src = recipe.model
    directory, state, base_config = None, None, None
    if src.init_from:
        directory = resolve_model_dir(resolve_name(src.init_from))
        base_config, state = collect_state(directory)
    config = start_config(recipe, base_config)
    if src.backbones:
        model, base = build_from_backbones(config), "backbones"
    else:
        tokenizer = load_tokenizer(directory) if directory is not None else None
        model, base = TinyGPTV(config, tokenizer or byte_level_tokenizer()), None
    if state is not None:
        load_matching(model, state, str(directory))
        base = str(directory)
    return model, base


def load_matching(model: TinyGPTV, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load an earlier stage's weights into a model that may have more (new LoRA) than the file. Every tensor of the
    file must find its parameter; a ViT position table is interpolated when the image size changed (stage 3 -> 4)."""
    expected = model.state_dict()
    state = align_lora_names(state, expected.keys())
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"{source}: keys the model does not have: {unexpected[:12]}")
    fixed = {}
    for key, value in state.items():
        want = expected[key].shape
        if value.shape != want and key.endswith("pos_embed") and value.dim() == 3:
            grid = int(round((want[1] - 1) ** 0.5))
            value = interpolate_pos_embed(value, grid)
        if value.shape != want:
            raise CheckpointError(f"{source}: {key} has shape {tuple(value.shape)}, the model {tuple(want)}")
        fixed[key] = value
    missing = set(expected) - set(fixed)
    model.load_state_dict(fixed, strict=False)
    model.newly_initialised = sorted(missing)  # reported by the trainer, never silent
