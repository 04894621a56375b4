# tinygptv: TinyGPT-V (arXiv 2312.16862) - EVA ViT-g -> ln_vision -> Q-Former -> two projections -> Phi-2 with LoRA and
# TinyGPT-V's norms. This file names the public Python API and imports nothing until a name is used.
"""The public Python API, imported on first use (so `import tinygptv` and the CLI's --help stay instant):

    import tinygptv
    model = tinygptv.load_model("tinygptv-nano")            # a bundled name, a folder, a Hub id or a preset
    pixels = tinygptv.ImageProcessor(model.config.vision)("examples/red_circle.png")
    prompt = tinygptv.single_prompt("chatml", "[vqa] What color is the shape?")
    print(model.generate(pixels, [prompt], max_new_tokens=20))
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "TinyGPTV": "tinygptv.model.tinygptv",
    "TinyGPTVConfig": "tinygptv.config",
    "GenerationSettings": "tinygptv.model.generation",
    "ImageProcessor": "tinygptv.data.image_processor",
    "single_prompt": "tinygptv.data.templates",
    "stream_generate": "tinygptv.model.streaming",
    "ChatSession": "tinygptv.serve.chat",
    "load_model": "tinygptv.checkpoint.loading",
    "load_pretrained": "tinygptv.checkpoint.native",
    "save_pretrained": "tinygptv.checkpoint.native",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tinygptv' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
