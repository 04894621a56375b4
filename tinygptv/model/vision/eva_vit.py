# EVA-CLIP ViT-g/14, the frozen image encoder that BLIP-2 and TinyGPT-V put first in the data path:
# image -> [vision tower] -> ln_vision -> Q-Former -> projector -> LLM. It turns S x S pixels into 1 + (S/14)^2 tokens
# of width 1408 (257 at 224 px, 1025 at 448 px). Module names match the LAVIS `eva_vit_g.pth` state-dict keys.
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinygptv.config import VisionConfig
from tinygptv.model.vision.pixels import check_image_size


class EvaPatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.proj(pixel_values)  # [B, width, S/p, S/p]
        return x.flatten(2).transpose(1, 2)  # [B, (S/p)^2, width], patches in row-major order


class EvaAttention(nn.Module):
    """One fused qkv projection without bias plus separate q and v biases. EVA-CLIP has no key bias: it would add the
    same amount to every logit of a query, which softmax ignores, so the checkpoint stores only `q_bias`/`v_bias`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.heads
        self.head_dim = cfg.width // cfg.heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(cfg.width))
        self.v_bias = nn.Parameter(torch.zeros(cfg.width))
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, hidden_states: Tensor) -> Tensor:
        batch, seq_len, width = hidden_states.shape
        qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))  # [3*width]
        qkv = F.linear(hidden_states, self.qkv.weight, qkv_bias)  # [B, N, 3*width]
        qkv = qkv.reshape(batch, seq_len, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)  # each [B, heads, N, head_dim]
        out = F.scaled_dot_product_attention(query, key, value, scale=self.scale)  # [B, heads, N, head_dim]
        out = out.transpose(1, 2).reshape(batch, seq_len, width)  # [B, N, width]
        return self.proj(out)


class EvaMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.act = nn.GELU()  # exact erf GELU, as EVA was trained
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class EvaBlock(nn.Module):
    """Pre-norm block. The EVA options BLIP-2 switches off (layer-scale, relative position bias, drop-path, dropout)
    are simply absent, so nothing here can silently differ from the checkpoint's forward."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = EvaAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = EvaMLP(cfg)

    def forward(self, hidden_states: Tensor) -> Tensor:
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states))
        return hidden_states + self.mlp(self.norm2(hidden_states))


class EvaViT(nn.Module):
    """The ViT without final norm or head: BLIP-2 feeds every token of the last kept block (block 39 of EVA-CLIP-g's
    40, i.e. its second-to-last layer) through `ln_vision` into the Q-Former."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        if cfg.width % cfg.heads:
            raise ValueError(f"width {cfg.width} is not divisible by heads {cfg.heads}")
        self.image_size = cfg.image_size
        self.grid_size = cfg.image_size // cfg.patch_size
        self.num_tokens = 1 + self.grid_size**2  # read by the Q-Former side: image tokens per image
        self.num_features = cfg.width  # read by ln_vision and the Q-Former cross-attention: encoder width

        self.patch_embed = EvaPatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, cfg.width))
        self.blocks = nn.ModuleList(EvaBlock(cfg) for _ in range(cfg.depth))
        # Real weights always come from eva_vit_g.pth; this init only makes random (test) models non-degenerate.
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, pixel_values: Tensor) -> Tensor:
        check_image_size(pixel_values, self.image_size)
        # Follow the weights' dtype so the tower also runs after .to(torch.bfloat16) / .half().
        pixel_values = pixel_values.to(self.patch_embed.proj.weight.dtype)  # [B, 3, S, S]
        patches = self.patch_embed(pixel_values)  # [B, (S/p)^2, width]
        cls = self.cls_token.expand(patches.shape[0], -1, -1)  # [B, 1, width]
        hidden_states = torch.cat((cls, patches), dim=1) + self.pos_embed  # [B, 1+(S/p)^2, width]
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return hidden_states  # [B, 1+(S/p)^2, width]


def interpolate_pos_embed(pos_embed: Tensor, new_grid: int) -> Tensor:
    """Resize a [1, 1+g*g, C] position embedding to [1, 1+new_grid^2, C]: the CLS position is kept as is, the g x g
    patch grid is resized bicubically (align_corners=False). This is how stage 4 runs at 448 px (32x32 patches) with
    the 224-px (16x16) EVA checkpoint, exactly as LAVIS does it."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]  # [1, 1, C], [1, g*g, C]
    grid = int(round(patch_pos.shape[1] ** 0.5))
    if grid * grid != patch_pos.shape[1]:
        raise ValueError(f"pos_embed has {patch_pos.shape[1]} patch positions, not a square grid")
    width = patch_pos.shape[2]
    patch_pos = patch_pos.reshape(1, grid, grid, width).permute(0, 3, 1, 2)  # [1, C, g, g]
    patch_pos = F.interpolate(patch_pos.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, width)  # [1, new_grid^2, C]
    return torch.cat((cls_pos, patch_pos.to(pos_embed.dtype)), dim=1)  # [1, 1+new_grid^2, C]


_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


def adapt_state_dict(state_dict: dict[str, Tensor], cfg: VisionConfig) -> dict[str, Tensor]:
    """Make an EVA state dict (e.g. LAVIS `eva_vit_g.pth`) fit `EvaViT(cfg)` so it loads with strict=True.

    Two differences are expected and handled, everything else is left for load_state_dict to report:
    - blocks at index >= cfg.depth are dropped (eva_vit_g.pth has 40 blocks, BLIP-2 keeps 39; the official code
      dropped them silently through strict=False);
    - a `pos_embed` whose grid differs from image_size / patch_size is resized with `interpolate_pos_embed`.
    Returns a new dict; the input is not modified.
    """
    adapted = {}
    for key, value in state_dict.items():
        match = _BLOCK_KEY.match(key)
        if match and int(match.group(1)) >= cfg.depth:
            continue
        adapted[key] = value
    grid = cfg.image_size // cfg.patch_size
    pos_embed = adapted.get("pos_embed")
    if pos_embed is not None and pos_embed.shape[1] != 1 + grid * grid:
        adapted["pos_embed"] = interpolate_pos_embed(pos_embed, grid)
    return adapted
