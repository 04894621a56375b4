# Shared fixtures: the tiny preset with random weights, and a tiny model trained for a few seconds to answer the
# colour of a red or blue image, so generation, streaming and the CLI can be checked against a known answer.
from __future__ import annotations

import pytest
import torch
from PIL import Image

from tinygptv.config import preset
from tinygptv.data.image_processor import ImageProcessor
from tinygptv.data.templates import single_prompt
from tinygptv.data.tokenizer import byte_level_tokenizer
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.checkpoint.native import save_pretrained

COLOURS = {"red": (220, 20, 20), "blue": (20, 20, 220)}
QUESTION = "what colour is it?"


def tiny_model(seed: int = 0) -> TinyGPTV:
    torch.manual_seed(seed)
    return TinyGPTV(preset("tiny"), byte_level_tokenizer()).eval()


@pytest.fixture
def model() -> TinyGPTV:
    return tiny_model()


@pytest.fixture(scope="session")
def colour_images(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("images")
    paths = {}
    for name, rgb in COLOURS.items():
        paths[name] = str(folder / f"{name}.png")
        Image.new("RGB", (40, 30), rgb).save(paths[name])
    return paths


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory, colour_images) -> str:
    """A tiny model that has learned: red image -> "red", blue image -> "blue" (all weights trained, ~3 s)."""
    model = tiny_model(seed=1)
    pixels = ImageProcessor(model.config.vision)([colour_images["red"], colour_images["blue"]])
    prompt = single_prompt("stage3", QUESTION)
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        loss = model(pixels, [prompt, prompt], ["red", "blue"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, f"the fixture model did not learn its two answers (loss {loss.item():.3f})"
    out = tmp_path_factory.mktemp("models") / "colours"
    save_pretrained(model.eval(), out)
    return str(out)
