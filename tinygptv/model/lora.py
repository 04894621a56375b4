# LoRA through peft, injected in place into the LLM (no PeftModel wrapper, so module paths stay those of the LM).
# Data path: it changes the LLM's attention projections only (QKV and output, r 64, alpha 16 in TinyGPT-V).
from __future__ import annotations

import logging
import re

# peft imports bitsandbytes when it is installed, and bitsandbytes' CPU backend then warns about an optional Hub kernel
# it cannot fetch offline; that says nothing to our users, so its logger shows errors only. Every path that may import
# bitsandbytes (peft here, --quant bnb-* in tinygptv.quant) comes through this module first.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
from peft import LoraConfig as PeftLoraConfig  # noqa: E402
from peft import inject_adapter_in_model  # noqa: E402
from torch import nn

from tinygptv.config import LoRAConfig


def add_lora(llm: nn.Module, cfg: LoRAConfig) -> nn.Module:
    if cfg.r <= 0:
        return llm
    # Anchor on the attention block so a module named like a target elsewhere (an MLP "dense") is never wrapped.
    targets = "|".join(re.escape(t) for t in cfg.target_modules)
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=rf".*\.self_attn\.({targets})",
        bias="none",
    )
    return inject_adapter_in_model(peft_cfg, llm)


def is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def merge_lora(llm: nn.Module) -> int:
    """Fold every LoRA delta into its base Linear and put the plain Linear back (same module paths as a model built
    with r = 0), so inference pays nothing for the adapter. Returns how many layers were merged."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(llm.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(llm.get_submodule(parent_name) if parent_name else llm, child, module.get_base_layer())
            merged += 1
    return merged
