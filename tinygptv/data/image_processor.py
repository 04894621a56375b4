# Image preprocessing, the step before the vision tower in the data path
# (image file -> open_image -> [ImageProcessor] -> vision tower -> ln_vision -> Q-Former -> projector -> LLM).
# It reproduces BLIP-2's eval transform as TinyGPT-V uses it: bicubic resize to a square (no crop), CLIP mean/std.
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

from tinygptv.config import VisionConfig
from tinygptv.data.image_file import DEFAULT_MAX_PIXELS, EncodedImage, open_image, to_rgb

ImageInput = Union[str, Path, EncodedImage, Image.Image]


class ImageProcessor:
    """Turns image files (paths, EncodedImage) or PIL images into the normalised [B, 3, S, S] float32 batch the vision
    tower expects. Files are opened with open_image, under this processor's pixel limit.

    The whole image is squashed to S x S (aspect ratio not kept) rather than centre-cropped, because that is what
    every TinyGPT-V stage trained on; a crop would drop content the model was used to seeing (e.g. boxes near edges
    in stage 4)."""

    def __init__(self, cfg: VisionConfig, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.image_size = cfg.image_size
        self.max_pixels = max_pixels
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)

    def open(self, source, name: str | None = None) -> Image.Image:
        """open_image with this processor's limit and draft size: for callers that check an image before using it."""
        return open_image(source, name=name, max_pixels=self.max_pixels, draft_size=self.image_size)

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        if isinstance(images, (str, Path, EncodedImage, Image.Image)):
            images = [images]
        return torch.stack([self._one(image) for image in images])  # [B, 3, S, S]

    def _one(self, image: ImageInput) -> torch.Tensor:
        image = to_rgb(image) if isinstance(image, Image.Image) else self.open(image)
        image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # [S, S, 3] uint8
        pixels = pixels.permute(2, 0, 1).to(torch.float32) / 255.0  # [3, S, S] in [0, 1]
        return (pixels - self.mean) / self.std  # [3, S, S]
