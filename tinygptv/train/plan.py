# `tinygptv train RECIPE --dry-run`: the GPU memory a recipe will need (weights, gradients, optimizer state,
# activations with and without gradient checkpointing), from the model built on the meta device. No data is read.
from __future__ import annotations

import torch

from tinygptv.checkpoint.hub import resolve_model_dir
from tinygptv.config import TinyGPTVConfig
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.train.recipe import Recipe
from tinygptv.train.start import start_config
from tinygptv.train.tune import apply_tune

GB = 1024**3
# Text around the image that a template adds (role markers, <Img></Img>, an instruction): a generous estimate in
# tokens; stages 1-2 (template "none") have none. The answer part is bounded by max_txt_len.
PROMPT_TOKENS = 64


def plan_memory(recipe: Recipe, half_bytes: int = 2) -> dict:
    base_config = None
    if recipe.model.init_from and not recipe.model.preset:
        base_config = TinyGPTVConfig.load(resolve_model_dir(recipe.model.init_from) / "config.json")
    config = start_config(recipe, base_config)
    with torch.device("meta"):
        model = TinyGPTV(config)
    apply_tune(model, recipe.tune)
    frozen_bytes = trainable = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            trainable += p.numel()
        else:
            # frozen weights in half precision on the GPU, except the Q-Former, which the library keeps in fp32
            frozen_bytes += p.numel() * (4 if name.startswith("connector.") else half_bytes)
    llm = config.llm
    prompt_tokens = 0 if config.prompt.template == "none" else PROMPT_TOKENS
    seq = 1 + prompt_tokens + config.qformer.num_query_tokens + config.prompt.max_txt_len
    batch = max(d.batch_size for d in recipe.datasets)
    b, s, h, a, layers = batch, seq, llm.hidden_size, llm.num_heads, llm.num_layers
    # Per transformer layer without recomputation (Korthikanti et al. 2022, half-precision activations):
    # s*b*h*(34 + 5*a*s/h) bytes; the parallel Phi block stores about the same.
    per_layer = s * b * h * (34 + 5 * a * s / h)
    logits = b * s * llm.vocab_size * 4 * 2  # fp32 logits and their gradient for the loss
    full = layers * per_layer + logits
    # With checkpointing only each layer's input stays, plus one layer being recomputed.
    checkpointed = layers * s * b * h * half_bytes + per_layer + logits
    vision = config.vision
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1 if vision.name == "eva_vit_g" else 64
    vision_peak = b * tokens * vision.width * 12 * half_bytes  # transient, frozen tower runs without a graph
    parts = {
        "weights (frozen, half precision; Q-Former fp32)": frozen_bytes,
        "weights (trainable, fp32)": trainable * 4,
        "gradients (fp32)": trainable * 4,
        "AdamW state (2 x fp32)": trainable * 8,
    }
    static = sum(parts.values())
    return {
        "recipe_batch": batch,
        "sequence_tokens": seq,
        "trainable_parameters": trainable,
        "parts_gb": {k: v / GB for k, v in parts.items()},
        "activations_gb": {"without checkpointing": (full + vision_peak) / GB,
                           "with gradient checkpointing": (checkpointed + vision_peak) / GB},
        "total_gb": {"without checkpointing": (static + full + vision_peak) / GB,
                     "with gradient checkpointing": (static + checkpointed + vision_peak) / GB},
        "gradient_checkpointing_in_recipe": recipe.gradient_checkpointing,
    }


def format_plan(plan: dict, card_gb: float = 24.0) -> str:
    lines = [f"batch {plan['recipe_batch']} x ~{plan['sequence_tokens']} tokens, "
             f"{plan['trainable_parameters']:,} trainable parameters"]
    for k, v in plan["parts_gb"].items():
        lines.append(f"  {k:<50}{v:8.2f} GB")
    for k, v in plan["activations_gb"].items():
        lines.append(f"  activations {k:<38}{v:8.2f} GB")
    for k, v in plan["total_gb"].items():
        verdict = "fits" if v < card_gb * 0.92 else "does not fit"
        lines.append(f"  TOTAL {k:<44}{v:8.2f} GB  ({verdict} a {card_gb:.0f} GB card)")
    lines.append("Estimates, not measurements: allocator overhead and CUDA context add about 1 GB.")
    return "\n".join(lines)
