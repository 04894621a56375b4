# The work the data path does, counted from the config and the built model rather than measured: FLOPs per encoded
# image (EVA ViT + Q-Former + projections). Bytes of weights per decoded token come from
# tinygptv.quant.weight_bytes_per_token. Both are the numerators of the bench's "fraction of the machine's roof".
from __future__ import annotations

from tinygptv.config import TinyGPTVConfig


def vision_tower_flops(config: TinyGPTVConfig) -> int | None:
    """Multiply-adds x 2 of the EVA ViT for one image: every matmul weight meets every token once, plus attention's
    QK^T and AV (2*N^2*D each) per block, plus the patch convolution. Norms, GELU and softmax are left out (under 1%).
    None for towers we have no count for (EfficientNet): the bench then reports their time only."""
    v = config.vision
    if v.name != "eva_vit_g":
        return None
    grid = v.image_size // v.patch_size
    tokens = 1 + grid * grid
    d, m = v.width, v.mlp_dim
    matmul_params = 4 * d * d + 2 * d * m  # qkv (3 d^2) + proj (d^2) + fc1 (d m) + fc2 (m d)
    per_block = 2 * matmul_params * tokens + 4 * tokens * tokens * d
    patch_embed = 2 * (3 * v.patch_size * v.patch_size * d) * grid * grid
    return v.depth * per_block + patch_embed


def connector_flops(config: TinyGPTVConfig, vision_tokens: int, vision_width: int) -> int:
    """The Q-Former (queries only: self-attention and feed-forward every layer, cross-attention to the vision tokens
    on layers 0, f, 2f, ...) and the two projections. About 1% of the ViT at full size; counted so that the encode
    fraction is not flattered by time spent outside the tower."""
    q = config.qformer
    n_q, h, n_v = q.num_query_tokens, q.hidden_size, vision_tokens
    self_attn = 2 * 4 * h * h * n_q + 4 * n_q * n_q * h
    ffn = 2 * 2 * h * q.intermediate_size * n_q
    cross = 2 * (2 * h * h * n_q + 2 * vision_width * h * n_v) + 4 * n_q * n_v * h
    cross_layers = len(range(0, q.num_layers, q.cross_attention_frequency))
    projector = 2 * n_q * (h * config.projector.hidden_size + config.projector.hidden_size * config.llm.hidden_size)
    return q.num_layers * (self_attn + ffn) + cross_layers * cross + projector


def encode_flops(config: TinyGPTVConfig, vision_tokens: int, vision_width: int) -> int | None:
    tower = vision_tower_flops(config)
    return None if tower is None else tower + connector_flops(config, vision_tokens, vision_width)
