# Image preprocessing, the step before the vision tower in the data path
# (image -> [ImageProcessor] -> vision tower -> ln_vision -> Q-Former -> projector -> LLM).
# It reproduces BLIP-2's eval transform as TinyGPT-V uses it: bicubic resize to a square (no crop), CLIP mean/std.
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from tinygptv.config import VisionConfig

ImageInput = Union[str, Path, Image.Image]


class ImageProcessor:
    """Turns paths or PIL images into the normalised [B, 3, S, S] float32 batch the vision tower expects.

    The whole image is squashed to S x S (aspect ratio not kept) rather than centre-cropped, because that is what
    every TinyGPT-V stage trained on; a crop would drop content the model was used to seeing (e.g. boxes near edges
    in stage 4)."""

    def __init__(self, cfg: VisionConfig):
        self.image_size = cfg.image_size
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        return torch.stack([self._one(image) for image in images])  # [B, 3, S, S]

    def _one(self, image: ImageInput) -> torch.Tensor:
        image = open_image(image) if isinstance(image, (str, Path)) else image
        image = image.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # [S, S, 3] uint8
        pixels = pixels.permute(2, 0, 1).to(torch.float32) / 255.0  # [3, S, S] in [0, 1]
        return (pixels - self.mean) / self.std  # [3, S, S]


def open_image(path: str | Path) -> Image.Image:
    """Open and decode now, so a bad file fails here with its path instead of deep inside a batch."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decodes the pixels, so a truncated file fails here too
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not an image file ({e})") from None
