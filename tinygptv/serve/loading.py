# How every inference command (ask, chat, and later serve/demo/eval) turns --model into a ready TinyGPTV and its
# image processor: a preset name builds random weights, anything else is a folder of ours or a Hub id.
from __future__ import annotations

import sys

import torch

from tinygptv.config import PRESETS, preset
from tinygptv.data.image_processor import ImageProcessor
from tinygptv.data.tokenizer import byte_level_tokenizer
from tinygptv.model.tinygptv import TinyGPTV

DEFAULT_MODEL = "tiny"


def load_model(name: str = DEFAULT_MODEL, *, dtype: torch.dtype | None = None, quiet: bool = False) -> TinyGPTV:
    if name in PRESETS:
        if not quiet:
            print(f"note: {name!r} is a preset: its weights are random, so its answers are noise. Pass --model with "
                  "a trained folder or a converted official checkpoint for real answers.", file=sys.stderr)
        model = TinyGPTV(preset(name), byte_level_tokenizer()).eval()
        return model.to(dtype) if dtype is not None else model
    return TinyGPTV.from_pretrained(name, dtype=dtype)


def image_processor_for(model: TinyGPTV) -> ImageProcessor:
    return ImageProcessor(model.config.vision)
