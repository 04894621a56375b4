# Vision towers by exact name: the first stage of the data path
# (image -> [vision tower] -> ln_vision -> Q-Former -> projector -> LLM). `VisionConfig.name` picks the class.
from __future__ import annotations

from torch import nn

from tinygptv.config import VisionConfig
from tinygptv.model.vision.efficientnet import EfficientNetLite0
from tinygptv.model.vision.eva_vit import EvaViT, adapt_state_dict, interpolate_pos_embed
from tinygptv.registry import Registry

# Every tower takes a VisionConfig, maps [B, 3, S, S] pixels to [B, num_tokens, num_features], and exposes
# `num_features` (token width) and `num_tokens` (tokens per image) so the Q-Former can be sized without running it.
VISION_TOWERS: Registry = Registry("vision tower")
VISION_TOWERS.register("eva_vit_g", EvaViT)
VISION_TOWERS.register("efficientnet_lite0", EfficientNetLite0)


def build_vision_tower(cfg: VisionConfig) -> nn.Module:
    return VISION_TOWERS[cfg.name](cfg)


__all__ = [
    "VISION_TOWERS", "EfficientNetLite0", "EvaViT", "adapt_state_dict", "build_vision_tower", "interpolate_pos_embed",
]
