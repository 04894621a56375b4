# LoRA through peft, injected in place into the LLM (no PeftModel wrapper, so module paths stay those of the LM).
# Data path: it changes the LLM's attention projections only (QKV and output, r 64, alpha 16 in TinyGPT-V).
from __future__ import annotations

import logging
import re

from torch import Tensor, nn

from tinygptv.config import LoRAConfig
from tinygptv.model.weights import without_lora

# peft imports bitsandbytes when it is installed, and bitsandbytes' CPU backend then warns about an optional Hub kernel
# it cannot fetch offline; that says nothing to our users, so its logger shows errors only. Every path that may import
# bitsandbytes (peft here, --quant bnb-* in tinygptv.quant) comes through this module first.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
ADAPTER = "default"  # the adapter name inject_adapter_in_model gives: keys are X.lora_A.default.weight


def add_lora(llm: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """peft is imported here, when a model is built with LoRA (training, eval of an unmerged model), not when this
    module is: with bitsandbytes installed, importing peft imports it and through it torch's compiler, seconds that
    an inference load (which merges LoRA into the weights it reads, merge_lora_into_state) does not need."""
    if cfg.r <= 0:
        return llm
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

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


def merge_lora_into_state(state: dict[str, Tensor], cfg: LoRAConfig) -> dict[str, Tensor]:
    """The weights of a model built with LoRA, loaded from `state` and merged (merge_lora), as a state dict for the
    model built without it: each adapted W becomes W + (alpha / r) * B @ A, as peft merges (in fp32, cast back to W's
    dtype), names lose `.base_layer.`, the adapter tensors go. Building and then merging 120 adapter modules was most
    of TinyGPT-V-nano's loading time."""
    scaling = cfg.alpha / cfg.r
    out = {without_lora(k): v for k, v in state.items() if not is_lora_param(k)}
    suffix = f".lora_A.{ADAPTER}.weight"
    for key in [k for k in state if k.endswith(suffix)]:
        prefix = key[: -len(suffix)]
        down, up = state[key], state[f"{prefix}.lora_B.{ADAPTER}.weight"]  # [r, in], [out, r]
        weight = out[f"{prefix}.weight"]
        out[f"{prefix}.weight"] = (weight.float() + (up.float() @ down.float()) * scaling).to(weight.dtype)
    return out
