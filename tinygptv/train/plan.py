# `tinygptv train RECIPE --dry-run`: the GPU memory a recipe will need on one process (weights, gradients, optimizer
# state, activations with and without gradient checkpointing), from the model built on the meta device. No data is
# read. Estimates: benchmarks/train_memory.py measures the same runs on a GPU.
from __future__ import annotations

import torch

from tinygptv.checkpoint.hub import resolve_model_dir
from tinygptv.config import CONFIG_NAME, TinyGPTVConfig
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.train.recipe import Recipe
from tinygptv.train.start import start_config
from tinygptv.train.tune import apply_tune

GiB = 1024**3
# Text around the image that a template adds (role markers, <Img></Img>, an instruction): a generous estimate in
# tokens; stages 1-2 (template "none") have none. The answer part is bounded by max_txt_len.
PROMPT_TOKENS = 64
# Bytes one decoder layer keeps for the backward pass per token and per hidden unit, in bf16, by LM and by what of it
# trains: measured with `python benchmarks/saved_activations.py --preset P --llm POLICY` (autograd's saved tensors,
# on the CPU, torch 2.13; the same for 128 to 1121 tokens: attention through SDPA keeps no [heads, S, S] tensor).
# Korthikanti et al.'s 34 (+ 5 a s / h without fused attention) assumes one fused GELU; Phi-2's tanh GELU runs as
# separate element-wise ops that each keep a 4h-wide tensor, and the q/k LayerNorms keep their inputs too.
# "frozen" covers the norms-only policy too; Phi-2's was measured with frozen LoRA layers present (stage-4 preset;
# the stage-1 preset, which has none, keeps 59.2).
LAYER_BYTES = {
    "phi": {"frozen": 61.2, "lora": 67.3, "full": 79.3},  # presets tinygptv-stage4 / tinygptv-stage1
    "llama": {"frozen": 50.6, "lora": 58.9, "full": 68.2},  # preset nano
}
# Per answer position the LM head runs at (the loss reads no other): fp32 log-probabilities kept for backward, then
# their gradient and the logits' gradient while the backward pass starts.
LOGIT_BYTES = 12


def llm_policy_class(llm: str) -> str:
    return {"lora": "lora", "lora+norms": "lora", "full": "full"}.get(llm, "frozen")


def plan_memory(recipe: Recipe, half_bytes: int = 2) -> dict:
    base_config = None
    if recipe.model.init_from and not recipe.model.preset:
        base_config = TinyGPTVConfig.load(resolve_model_dir(recipe.model.init_from) / CONFIG_NAME)
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
    b, s, h, layers = batch, seq, llm.hidden_size, llm.num_layers
    per_layer = s * b * h * LAYER_BYTES[llm.name][llm_policy_class(recipe.tune.llm)] * half_bytes / 2
    logits = b * config.prompt.max_txt_len * llm.vocab_size * LOGIT_BYTES
    full = layers * per_layer + logits
    # With checkpointing only each layer's input stays, plus one layer being recomputed.
    checkpointed = layers * s * b * h * half_bytes + per_layer + logits
    vision = config.vision
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1 if vision.name == "eva_vit_g" else 64
    # The frozen tower runs without a graph, before the LLM: its working set is gone when the LLM's builds up.
    vision_peak = b * tokens * vision.width * 12 * half_bytes
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
        "parts_gb": {k: v / GiB for k, v in parts.items()},
        "activations_gb": {"without checkpointing": max(full, vision_peak) / GiB,
                           "with gradient checkpointing": max(checkpointed, vision_peak) / GiB},
        "total_gb": {"without checkpointing": (static + max(full, vision_peak)) / GiB,
                     "with gradient checkpointing": (static + max(checkpointed, vision_peak)) / GiB},
        "gradient_checkpointing_in_recipe": recipe.gradient_checkpointing,
    }


def format_plan(plan: dict, card_gb: float = 24.0) -> str:
    lines = [f"batch {plan['recipe_batch']} x ~{plan['sequence_tokens']} tokens, "
             f"{plan['trainable_parameters']:,} trainable parameters (sizes in GiB)",
             "  (batch: the recipe's largest per-step batch; tokens: BOS + template text + image embeddings + the "
             "longest answer, max_txt_len)"]
    for k, v in plan["parts_gb"].items():
        lines.append(f"  {k:<50}{v:8.2f} GiB")
    for k, v in plan["activations_gb"].items():
        lines.append(f"  activations {k:<38}{v:8.2f} GiB")
    used = "with gradient checkpointing" if plan["gradient_checkpointing_in_recipe"] else "without checkpointing"
    for k, v in plan["total_gb"].items():
        verdict = "fits" if v < card_gb * 0.92 else "does not fit"
        mark = "  <- this recipe" if k == used else ""
        lines.append(f"  TOTAL {k:<44}{v:8.2f} GiB  ({verdict} a {card_gb:.0f} GB card){mark}")
    switch = "off: gradient_checkpointing=false" if plan["gradient_checkpointing_in_recipe"] else \
        "on: gradient_checkpointing=true"
    lines.append(f"The recipe sets gradient checkpointing {'on' if plan['gradient_checkpointing_in_recipe'] else 'off'}"
                 f" (turn it {switch} as an override). Estimates, not measurements: allocator overhead and CUDA "
                 "context add about 1 GiB. With N processes each holds batch / N; FSDP also divides the weights, "
                 "gradients and AdamW state by N.")
    return "\n".join(lines)
