# What every vision tower checks of the pixels it is given, before: image -> [vision tower] -> ln_vision -> ... .
# The PyTorch towers and the engine's compiled tower (engine/openvino_vision.py) raise the same error.
from __future__ import annotations

from torch import Tensor


def check_image_size(pixel_values: Tensor, image_size: int) -> None:
    """A tower is built for one image size (its position embedding or feature grid): say so instead of failing
    somewhere inside it."""
    if pixel_values.shape[-2:] != (image_size, image_size):
        raise ValueError(f"expected images of {image_size}x{image_size} px, got {tuple(pixel_values.shape[-2:])}")
