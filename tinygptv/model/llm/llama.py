# A Llama-family language model (SmolLM2, TinyLlama, ...) with TinyGPT-V's extra norms as options, each a subclass
# that calls its parent and adds only what differs: per-head Q/K LayerNorm before the rotary embedding and an RMSNorm
# on the attention output. End of the data path: spliced embeddings -> this LM -> logits (generation: transformers).
from __future__ import annotations

from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaRMSNorm,
    apply_rotary_pos_emb,
)

from tinygptv.config import LLMConfig
from tinygptv.model.llm.attention import attend


def llama_config(cfg: LLMConfig, attn_implementation: str = "sdpa") -> LlamaConfig:
    if cfg.partial_rotary_factor != 1.0:
        raise ValueError(f"the llama adapter rotates whole heads; partial_rotary_factor {cfg.partial_rotary_factor} "
                         "would be silently ignored, set it to 1.0")
    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        head_dim=cfg.head_dim or cfg.hidden_size // cfg.num_heads,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.layer_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=False,
        attention_dropout=cfg.attention_dropout,
        mlp_bias=False,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )
    config._attn_implementation = attn_implementation
    config.qk_layernorm = cfg.qk_layernorm
    config.qk_layernorm_eps = cfg.layer_norm_eps
    config.attn_output_rmsnorm = cfg.attn_output_rmsnorm
    config.rmsnorm_eps = cfg.rmsnorm_eps
    return config


class TinyGPTVLlamaAttention(LlamaAttention):
    """Llama attention (grouped-query, full rotary) plus TinyGPT-V's `q_layernorm` / `k_layernorm`: one
    LayerNorm(head_dim) per role, its weights shared by every head, applied before RoPE as in the Phi block."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.qk_layernorm = config.qk_layernorm
        if self.qk_layernorm:
            self.q_layernorm = nn.LayerNorm(self.head_dim, eps=config.qk_layernorm_eps)
            self.k_layernorm = nn.LayerNorm(self.head_dim, eps=config.qk_layernorm_eps)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, H, S, Dh]
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, H_kv, S, Dh]
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, H_kv, S, Dh]
        if self.qk_layernorm:
            query = self.q_layernorm(query)
            key = self.k_layernorm(key)

        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        out, weights = attend(self, query, key, value, attention_mask, cache, **kwargs)
        return self.o_proj(out), weights


class TinyGPTVLlamaDecoderLayer(LlamaDecoderLayer):
    """Llama's sequential block with TinyGPT-V's RMSNorm on the attention output, before the residual add (the
    paper's figure): x + post_layernorm(attn(input_layernorm(x))), then + mlp(post_attention_layernorm(.))."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = TinyGPTVLlamaAttention(config, layer_idx)
        self.post_layernorm = (
            LlamaRMSNorm(config.hidden_size, eps=config.rmsnorm_eps) if config.attn_output_rmsnorm else nn.Identity()
        )

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        attn, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = hidden_states + self.post_layernorm(attn)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class TinyGPTVLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM (loss, generation, caches from transformers) with TinyGPT-V's block in every layer.

    With tied embeddings the state dict has no `lm_head.weight`: it is the embedding matrix, so a file never stores
    it twice (safetensors refuses shared tensors) and a strict load into a meta-built model re-ties the two."""

    _no_split_modules = ["TinyGPTVLlamaDecoderLayer"]
    _can_record_outputs = {"hidden_states": TinyGPTVLlamaDecoderLayer, "attentions": TinyGPTVLlamaAttention}

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        for i in range(config.num_hidden_layers):  # one at a time: the stock layer is freed as it is replaced
            self.model.layers[i] = TinyGPTVLlamaDecoderLayer(config, i)
        self.post_init()  # initialises what the replacement added (transformers skips what it already did)
        if config.tie_word_embeddings:
            self.register_state_dict_post_hook(_drop_tied_head)
            self._register_load_state_dict_pre_hook(_alias_tied_head, with_module=True)
            self.register_load_state_dict_post_hook(_retie_head)


def _tied(module) -> bool:
    """lm_head is still the embedding matrix (not replaced by a quantized layer, which holds its own codes)."""
    return type(module.lm_head) is nn.Linear


def _drop_tied_head(module, state_dict, prefix, local_metadata):
    if _tied(module):
        state_dict.pop(prefix + "lm_head.weight", None)


def _alias_tied_head(module, state_dict, prefix, *args):
    embed = state_dict.get(prefix + "model.embed_tokens.weight")
    if _tied(module) and embed is not None and prefix + "lm_head.weight" not in state_dict:
        state_dict[prefix + "lm_head.weight"] = embed


def _retie_head(module, incompatible_keys):
    # assign=True loads give lm_head its own Parameter object; make it the embedding's again (one tensor, one grad).
    if _tied(module):
        module.lm_head.weight = module.model.embed_tokens.weight


def build_llama(cfg: LLMConfig) -> TinyGPTVLlamaForCausalLM:
    return TinyGPTVLlamaForCausalLM(llama_config(cfg))


# What the TinyGPT-V recipe trains besides LoRA: the weight of every norm, named as in Llama.
LLAMA_TRAINABLE_NORMS = ("q_layernorm.weight", "k_layernorm.weight", "post_layernorm.weight",
                         "input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight")
# Norms TinyGPT-V adds: absent from the pretrained LM's weights, initialised fresh.
LLAMA_ADDED_NORMS = ("q_layernorm", "k_layernorm", "post_layernorm")
# LoRA on every attention projection (the Phi block has one fused QKV; Llama has separate q/k/v).
LLAMA_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
