# LLM adapters by exact name: each builds a causal LM (a transformers model with generate()) with TinyGPT-V's extra
# norms, and says which of its norm weights the recipe trains. Adding an LM is a new file plus a register() line.
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from tinygptv.config import LLMConfig
from tinygptv.model.llm.llama import LLAMA_ADDED_NORMS, LLAMA_LORA_TARGETS, LLAMA_TRAINABLE_NORMS, build_llama
from tinygptv.model.llm.phi import PHI_ADDED_NORMS, PHI_TRAINABLE_NORMS, build_phi
from tinygptv.registry import Registry


@dataclass(frozen=True)
class LLMAdapter:
    build: Callable[[LLMConfig], nn.Module]
    trainable_norms: tuple[str, ...]  # parameter-name suffixes of the norm weights TinyGPT-V trains
    added_norms: tuple[str, ...]  # module names TinyGPT-V adds (absent from the base LM's weights)
    # The attention projections a LoRAConfig.target_modules may name for this LM (TinyGPT-V puts LoRA on all of them).
    lora_targets: tuple[str, ...] = ()


LLM_ADAPTERS: Registry[LLMAdapter] = Registry("LLM adapter")
LLM_ADAPTERS.register("phi", LLMAdapter(build_phi, PHI_TRAINABLE_NORMS, PHI_ADDED_NORMS, ("query_key_value", "dense")))
LLM_ADAPTERS.register("llama", LLMAdapter(build_llama, LLAMA_TRAINABLE_NORMS, LLAMA_ADDED_NORMS, LLAMA_LORA_TARGETS))


def build_llm(cfg: LLMConfig) -> nn.Module:
    return LLM_ADAPTERS[cfg.name].build(cfg)
