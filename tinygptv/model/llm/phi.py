# The TinyGPT-V language model: transformers' Phi with three changes, each a subclass that calls its parent and
# alters only what differs: q/k/v fused in the official (head, q/k/v, dim) row order, the per-head Q/K LayerNorm
# switched on, and an RMSNorm on the attention branch. End of the data path: spliced embeddings -> LM -> logits.
from __future__ import annotations

import torch
from torch import nn
from transformers import PhiConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.phi.modeling_phi import PhiAttention, PhiDecoderLayer, PhiForCausalLM, apply_rotary_pos_emb

from tinygptv.config import LLMConfig
from tinygptv.model.llm.attention import attend


def phi_config(cfg: LLMConfig, attn_implementation: str = "sdpa") -> PhiConfig:
    config = PhiConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        resid_pdrop=cfg.resid_pdrop,
        embd_pdrop=cfg.embd_pdrop,
        attention_dropout=cfg.attention_dropout,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        layer_norm_eps=cfg.layer_norm_eps,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": cfg.rope_theta,
            "partial_rotary_factor": cfg.partial_rotary_factor,
        },
        qk_layernorm=cfg.qk_layernorm,
        tie_word_embeddings=False,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )
    config._attn_implementation = attn_implementation
    config.attn_output_rmsnorm = cfg.attn_output_rmsnorm
    config.rmsnorm_eps = cfg.rmsnorm_eps
    return config


def fuse_qkv(q: nn.Linear, k: nn.Linear, v: nn.Linear, num_heads: int) -> nn.Linear:
    """One Linear whose output rows are ordered (head, q/k/v, head_dim), the transformers-4.36 layout of the official
    checkpoints, made from three separate projections (their start values, rearranged: no new random draws)."""
    hidden = q.in_features
    fused = nn.Linear(hidden, 3 * q.out_features, bias=True, device="meta")
    weight = torch.stack([p.weight.view(num_heads, -1, hidden) for p in (q, k, v)], dim=1)  # [H, 3, Dh, hidden]
    bias = torch.stack([p.bias.view(num_heads, -1) for p in (q, k, v)], dim=1)  # [H, 3, Dh]
    fused.weight = nn.Parameter(weight.reshape(-1, hidden))
    fused.bias = nn.Parameter(bias.reshape(-1))
    return fused


class TinyGPTVPhiAttention(PhiAttention):
    """Phi attention with q/k/v fused into one `query_key_value` (rows ordered head, q/k/v, head_dim), as in the
    official checkpoints. Fused, LoRA is exactly TinyGPT-V's: one A matrix shared by q, k and v (31,457,280 LoRA
    parameters, not the 41.9 M of separate q/k/v adapters). The per-head Q/K LayerNorm (config.qk_layernorm) is the
    parent's."""

    def __init__(self, config: PhiConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.query_key_value = fuse_qkv(self.q_proj, self.k_proj, self.v_proj, config.num_attention_heads)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        batch, seq = hidden_states.shape[:2]
        qkv = self.query_key_value(hidden_states).view(batch, seq, -1, 3, self.head_dim)  # [B, S, H, 3, Dh]
        query, key, value = (t.transpose(1, 2) for t in qkv.unbind(dim=3))  # each [B, H, S, Dh]
        if self.qk_layernorm:
            query = self.q_layernorm(query)
            key = self.k_layernorm(key)

        cos, sin = position_embeddings
        r = self.rotary_ndims
        q_rot, k_rot = apply_rotary_pos_emb(query[..., :r], key[..., :r], cos, sin)
        query = torch.cat((q_rot, query[..., r:]), dim=-1)
        key = torch.cat((k_rot, key[..., r:]), dim=-1)

        out, weights = attend(self, query, key, value, attention_mask, cache, **kwargs)
        return self.dense(out), weights


class TinyGPTVPhiDecoderLayer(PhiDecoderLayer):
    """Phi's parallel block with an RMSNorm on the attention branch only:
    x + drop(post_layernorm(attn(ln(x)))) + drop(mlp(ln(x))). (The paper's figure draws it sequentially; the official
    code is parallel.)"""

    def __init__(self, config: PhiConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = TinyGPTVPhiAttention(config, layer_idx)
        self.post_layernorm = (
            LlamaRMSNorm(config.hidden_size, eps=config.rmsnorm_eps) if config.attn_output_rmsnorm else nn.Identity()
        )

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        attn, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        attn = self.resid_dropout(self.post_layernorm(attn))
        mlp = self.resid_dropout(self.mlp(hidden_states))
        return attn + mlp + residual


class TinyGPTVPhiForCausalLM(PhiForCausalLM):
    """PhiForCausalLM (loss, generation, caches all from transformers) with TinyGPT-V's block in every layer."""

    _tied_weights_keys = {}  # Phi-2's head is its own matrix
    _no_split_modules = ["TinyGPTVPhiDecoderLayer"]
    _can_record_outputs = {"hidden_states": TinyGPTVPhiDecoderLayer, "attentions": TinyGPTVPhiAttention}

    def __init__(self, config: PhiConfig):
        super().__init__(config)
        for i in range(config.num_hidden_layers):  # one at a time: the stock layer is freed as it is replaced
            self.model.layers[i] = TinyGPTVPhiDecoderLayer(config, i)
        self.post_init()  # initialises what the replacement added (transformers skips what it already did)

    def _init_weights(self, module):
        super()._init_weights(module)
        # New norms start as identities (weight 1, bias 0) whatever the loader does: the official 8-bit path could
        # leave the never-saved q/k LayerNorm biases as uninitialised memory.
        if isinstance(module, LlamaRMSNorm):
            nn.init.ones_(module.weight)


def build_phi(cfg: LLMConfig) -> TinyGPTVPhiForCausalLM:
    return TinyGPTVPhiForCausalLM(phi_config(cfg))


# Parameter names the TinyGPT-V recipe trains besides LoRA: the weights of every norm.
PHI_TRAINABLE_NORMS = ("q_layernorm.weight", "k_layernorm.weight", "post_layernorm.weight",
                       "input_layernorm.weight", "final_layernorm.weight")
# Norms TinyGPT-V adds to Phi-2: absent from Phi-2 files, initialised fresh.
PHI_ADDED_NORMS = ("q_layernorm", "k_layernorm", "post_layernorm")
