# The TinyGPT-V language model: transformers' Phi with the fused (head, q/k/v, dim) QKV of the transformers-4.36
# layout, per-head Q/K LayerNorm before the partial rotary embedding, and an RMSNorm on the attention branch only.
# Sits at the end of the data path: spliced text + image embeddings -> this LM -> next-token logits.
from __future__ import annotations

import torch
from torch import nn
from transformers import PhiConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.phi.modeling_phi import (
    PhiAttention,
    PhiDecoderLayer,
    PhiForCausalLM,
    PhiMLP,
    PhiModel,
    PhiPreTrainedModel,
    PhiRotaryEmbedding,
    apply_rotary_pos_emb,
)

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


class FusedQKVPhiAttention(PhiAttention):
    """Phi attention with one `query_key_value` Linear whose rows are ordered (head, q/k/v, head_dim), as in
    transformers 4.36 and the official checkpoints. Keeping it fused keeps LoRA exactly as TinyGPT-V trains it: one
    A matrix shared by q, k and v (31,457,280 LoRA parameters, not the 41.9 M of separate q/k/v adapters)."""

    def __init__(self, config: PhiConfig, layer_idx: int):
        nn.Module.__init__(self)
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.num_key_value_groups = 1
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.rotary_ndims = int(self.head_dim * config.rope_parameters["partial_rotary_factor"])
        self.qk_layernorm = config.qk_layernorm
        if self.qk_layernorm:
            # One LayerNorm(head_dim) per role, its weights shared by every head.
            self.q_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        batch, seq = hidden_states.shape[:2]
        qkv = self.query_key_value(hidden_states).view(batch, seq, self.num_heads, 3, self.head_dim)
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
    """Phi's parallel block, x + drop(post_layernorm(attn(ln(x)))) + drop(mlp(ln(x))): the RMSNorm touches the
    attention branch only (the paper's figure draws it sequentially; the official code is parallel)."""

    def __init__(self, config: PhiConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)
        self.self_attn = FusedQKVPhiAttention(config, layer_idx)
        self.mlp = PhiMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_layernorm = (
            LlamaRMSNorm(config.hidden_size, eps=config.rmsnorm_eps) if config.attn_output_rmsnorm else nn.Identity()
        )
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

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


class TinyGPTVPhiModel(PhiModel):
    def __init__(self, config: PhiConfig):
        PhiPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [TinyGPTVPhiDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.rotary_emb = PhiRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.embed_dropout = nn.Dropout(config.embd_pdrop)
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()


class TinyGPTVPhiForCausalLM(PhiForCausalLM):
    """PhiForCausalLM (loss, generation, caches all from transformers) around the TinyGPT-V block."""

    _tied_weights_keys = {}
    _can_record_outputs = {"hidden_states": TinyGPTVPhiDecoderLayer, "attentions": FusedQKVPhiAttention}

    def __init__(self, config: PhiConfig):
        PhiPreTrainedModel.__init__(self, config)
        self.model = TinyGPTVPhiModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        # New norms start as identities (weight 1, bias 0) whatever the loader does: the official 8-bit path could
        # leave the never-saved q/k LayerNorm biases as uninitialised memory.
        if isinstance(module, LlamaRMSNorm):
            nn.init.ones_(module.weight)


def build_phi(cfg: LLMConfig) -> TinyGPTVPhiForCausalLM:
    return TinyGPTVPhiForCausalLM(phi_config(cfg))


# Parameter names the TinyGPT-V recipe trains besides LoRA (spec 2.3): the weights of every norm.
PHI_TRAINABLE_NORMS = ("q_layernorm.weight", "k_layernorm.weight", "post_layernorm.weight",
                       "input_layernorm.weight", "final_layernorm.weight")
# Norms TinyGPT-V adds to Phi-2: absent from Phi-2 files, initialised fresh.
PHI_ADDED_NORMS = ("q_layernorm", "k_layernorm", "post_layernorm")
