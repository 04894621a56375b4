# The BLIP-2 Q-Former connector: ln_vision on the vision tokens, then 32 learned queries that cross-attend to them.
# Data path: vision tower [B, N, Dv] -> ln_vision -> Q-Former -> [B, Q, Dq] -> projector.
from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from tinygptv.config import QFormerConfig


def blip2_qformer_config(cfg: QFormerConfig, encoder_width: int) -> Blip2QFormerConfig:
    config = Blip2QFormerConfig(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        layer_norm_eps=cfg.layer_norm_eps,
        cross_attention_frequency=cfg.cross_attention_frequency,
        encoder_hidden_size=encoder_width,
        use_qformer_text_input=False,  # only the query feed-forward path exists, as in BLIP-2's released Q-Former
    )
    config._attn_implementation = "sdpa"
    return config


class QFormerConnector(nn.Module):
    """ln_vision + query tokens + transformers' Blip2QFormerModel. The Q-Former stays in fp32 (the library casts the
    image tokens up to its dtype), which is also what the official model does."""

    def __init__(self, cfg: QFormerConfig, encoder_width: int):
        super().__init__()
        self.ln_vision = nn.LayerNorm(encoder_width, eps=cfg.ln_vision_eps)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.hidden_size))
        nn.init.normal_(self.query_tokens, std=0.02)
        self.qformer = Blip2QFormerModel(blip2_qformer_config(cfg, encoder_width))

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        # image_tokens [B, N, Dv] -> [B, Q, Dq]
        dtype = self.ln_vision.weight.dtype
        image_tokens = self.ln_vision(image_tokens.to(dtype))
        queries = self.query_tokens.expand(image_tokens.shape[0], -1, -1)
        return self.qformer(query_embeds=queries, encoder_hidden_states=image_tokens).last_hidden_state
