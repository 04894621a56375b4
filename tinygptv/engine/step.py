# The TinyGPT-V language model as one engine step, the graph an inference engine is given: spliced embeddings of the
# new tokens + 2-D attention mask over past and new tokens + positions + past K/V per layer -> logits at the asked
# positions + K/V per layer including the new tokens. Our own Phi / Llama modules run it, extra norms and all.
from __future__ import annotations

import torch
from torch import Tensor, nn

KV_ROLES = ("key", "value")


def kv_names(prefix: str, num_layers: int) -> list[str]:
    """past.0.key, past.0.value, past.1.key, ...: the names of the K/V inputs (prefix past) and outputs (present)."""
    return [f"{prefix}.{layer}.{role}" for layer in range(num_layers) for role in KV_ROLES]


INPUT_NAMES = ("inputs_embeds", "attention_mask", "position_ids", "logits_index")


class PassThroughCache:
    """What the attention layers call `cache.update` on during export: it appends the new K/V to the past ones given
    as graph inputs and keeps the result as the graph's outputs. transformers' DynamicCache starts from an empty
    Python-side tensor, which a traced graph cannot take as an input."""

    def __init__(self, past: list[tuple[Tensor, Tensor]]):
        self.past = past
        self.present: list[tuple[Tensor, Tensor] | None] = [None] * len(past)

    def update(self, key: Tensor, value: Tensor, layer_idx: int, **kwargs) -> tuple[Tensor, Tensor]:
        past_key, past_value = self.past[layer_idx]
        key = torch.cat([past_key, key], dim=2)  # [B, H_kv, P + S, Dh]
        value = torch.cat([past_value, value], dim=2)
        self.present[layer_idx] = (key, value)
        return key, value


def additive_causal_mask(attention_mask: Tensor, new_tokens: int, dtype: torch.dtype) -> Tensor:
    """[B, P + S] keep-mask (1 = a real token, 0 = padding) -> [B, 1, S, P + S] additive mask: 0 where the new token
    i (at absolute position P + i) may attend key j (j <= P + i and j not padding), the dtype's minimum elsewhere.
    Built from tensor shapes only, so a traced graph keeps both lengths dynamic; transformers passes a 4-D mask to the
    attention as it is."""
    total = attention_mask.shape[1]
    query_at = torch.arange(new_tokens) + (total - new_tokens)  # [S]
    key_at = torch.arange(total)  # [P + S]
    allowed = (key_at[None, :] <= query_at[:, None])[None, None] & attention_mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


class LLMStep(nn.Module):
    """One forward of a TinyGPT-V causal LM (TinyGPTVPhiForCausalLM or TinyGPTVLlamaForCausalLM, LoRA merged) with
    its K/V cache as explicit tensors, so an engine can trace it once and keep the K/V as its own state.

    logits_index [K] picks the positions whose logits are computed: generate() needs only the last one, and the
    vocabulary projection over a whole 129-token prompt would cost Phi-2 a quarter of its prefill."""

    def __init__(self, llm: nn.Module):
        super().__init__()
        self.llm = llm
        self.num_layers = llm.config.num_hidden_layers

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor, logits_index: Tensor,
                *past: Tensor) -> tuple[Tensor, ...]:
        # inputs_embeds [B, S, D], attention_mask [B, P + S], position_ids [B, S], logits_index [K],
        # past: 2 x num_layers tensors [B, H_kv, P, Dh] (key, value of layer 0, then layer 1, ...)
        cache = PassThroughCache([(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        mask = additive_causal_mask(attention_mask, inputs_embeds.shape[1], inputs_embeds.dtype)
        hidden = self.llm.model(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids,
                                cache=cache, use_cache=True).last_hidden_state  # [B, S, D]
        logits = self.llm.lm_head(hidden.index_select(1, logits_index))  # [B, K, V]
        return (logits, *[t for kv in cache.present for t in kv])


def kv_shape(llm_config) -> tuple[int, int]:
    """(K/V heads, head dim) of a transformers LM config: the per-token shape of one layer's key or value."""
    heads = getattr(llm_config, "num_key_value_heads", None) or llm_config.num_attention_heads
    head_dim = getattr(llm_config, "head_dim", None) or llm_config.hidden_size // llm_config.num_attention_heads
    return heads, head_dim


def example_inputs(llm: nn.Module, *, batch: int = 2, past: int = 3, new: int = 5) -> tuple[Tensor, ...]:
    """Inputs to trace LLMStep with. Lengths above one and a past that is not empty, so no size is taken as fixed."""
    config = llm.config
    heads, head_dim = kv_shape(config)
    embeds = torch.zeros(batch, new, config.hidden_size)  # the engine computes in fp32, whatever the weights
    mask = torch.ones(batch, past + new, dtype=torch.long)
    positions = torch.arange(past, past + new).expand(batch, -1).contiguous()
    logits_index = torch.tensor([new - 1])
    kv = [torch.zeros(batch, heads, past, head_dim) for _ in range(2 * config.num_hidden_layers)]
    return (embeds, mask, positions, logits_index, *kv)
