# The attention step every TinyGPT-V LLM block shares once its Q/K/V are projected, normed and rotated: KV-cache
# update, then transformers' attention backend (sdpa by default, eager on request). Used by phi.py and llama.py.
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward


def attend(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
           cache=None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """query [B, H, S, Dh], key/value [B, H_kv, S, Dh] -> output [B, S, H*Dh] (before the output projection).
    The module provides config, layer_idx, scaling, attention_dropout and num_key_value_groups."""
    if cache is not None:
        key, value = cache.update(key, value, module.layer_idx, kwargs=kwargs)
    attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
        module.config._attn_implementation, eager_attention_forward
    )
    out, weights = attention(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0 if not module.training else module.attention_dropout,
        scaling=module.scaling,
        **kwargs,
    )
    batch, seq = query.shape[0], query.shape[2]
    return out.reshape(batch, seq, -1).contiguous(), weights
