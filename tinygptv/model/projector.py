# The two linear projections between the Q-Former and the LLM: llama_proj (Q-Former width -> 4096, from MiniGPT-4)
# and llama_proj2 (4096 -> LLM width). Data path: Q-Former [B, Q, Dq] -> projector -> [B, Q, D_llm] -> splice.
from __future__ import annotations

import torch
from torch import nn


class Projector(nn.Module):
    """No activation between the two layers: they compose to one affine map, kept as two so the official weights
    (and the MiniGPT-4 initialisation of the first) load as they are."""

    def __init__(self, in_features: int, hidden_size: int, out_features: int):
        super().__init__()
        self.llama_proj = nn.Linear(in_features, hidden_size)
        self.llama_proj2 = nn.Linear(hidden_size, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.llama_proj.weight.dtype
        return self.llama_proj2(self.llama_proj(x.to(dtype)))
