# `tinygptv info`: parameter counts per component of a preset or checkpoint config, computed on the meta device so
# the full-size model costs no memory. Reads the same model the data path uses, never a second description of it.
from __future__ import annotations

import torch

from tinygptv.config import TinyGPTVConfig
from tinygptv.model.llm import LLM_ADAPTERS
from tinygptv.model.tinygptv import TinyGPTV, component_of


def parameter_counts(config: TinyGPTVConfig) -> dict:
    with torch.device("meta"):
        model = TinyGPTV(config)
    added = LLM_ADAPTERS[config.llm.name].added_norms
    counts = dict.fromkeys(("vision", "ln_vision", "qformer", "projector", "llm", "added_norms", "lora"), 0)
    trainable = 0
    for name, param in model.named_parameters():
        counts[component_of(name, added)] += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return {
        "parameters": counts,
        "total": sum(counts.values()),
        "trainable": trainable,
        "image_size": config.vision.image_size,
        "vision_tokens": model.visual_encoder.num_tokens,
        "image_embeddings": config.qformer.num_query_tokens,
        "llm": config.llm.name,
        "lora_r": config.lora.r,
        "template": config.prompt.template,
    }


def format_counts(info: dict) -> str:
    labels = {
        "vision": "vision tower", "ln_vision": "ln_vision", "qformer": "Q-Former (+ query tokens)",
        "projector": "projections", "llm": "LLM (pretrained)", "added_norms": "added norms", "lora": "LoRA",
    }
    lines = [f"{labels[k]:<28}{v:>16,}" for k, v in info["parameters"].items()]
    lines += [f"{'total':<28}{info['total']:>16,}", f"{'trainable (official recipe)':<28}{info['trainable']:>16,}"]
    lines.append(
        f"image {info['image_size']} px -> {info['vision_tokens']} vision tokens -> {info['image_embeddings']} "
        f"image embeddings; LLM {info['llm']}, LoRA r {info['lora_r']}, template {info['template']}"
    )
    return "\n".join(lines)
