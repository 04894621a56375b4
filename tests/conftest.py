# Shared fixtures: one converted-weights cache for the whole session (never the user's), the bundled nano model loaded
# once, the tiny preset with random weights, and a tiny model trained for a few seconds to answer the colour of a red
# or blue image, so generation, streaming and the CLI can be checked against a known answer.
from __future__ import annotations

import os

# One thread for torch here and in every subprocess a test starts: the test models are tiny, so a second thread gains
# nothing, and on a shared machine two threads that spin-wait for each other made the suite 6x slower (measured).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tinygptv.checkpoint.loading import load_model
from tinygptv.checkpoint.native import save_pretrained
from tinygptv.config import CACHE_ENV, preset
from tinygptv.data.image_processor import ImageProcessor
from tinygptv.data.templates import single_prompt
from tinygptv.data.tokenizer import byte_level_tokenizer
from tinygptv.model.tinygptv import TinyGPTV

COLOURS = {"red": (220, 20, 20), "blue": (20, 20, 220)}
QUESTION = "what colour is it?"


def tiny_model(seed: int = 0) -> TinyGPTV:
    torch.manual_seed(seed)
    return TinyGPTV(preset("tiny"), byte_level_tokenizer()).eval()


# Fixtures that need SmolLM2's weights converted from its GGUF (~25 s once per session): their tests are `slow`.
NANO_FIXTURES = ("nano", "nano_backbones", "converted")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in NANO_FIXTURES):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """Every test reads and writes one fresh TINYGPTV_CACHE, whatever the test order: the first test that needs
    SmolLM2's converted weights converts them (~25 s) and the rest reuse them; the user's cache is never touched."""
    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("tinygptv-cache"))
    yield os.environ[CACHE_ENV]
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before


@pytest.fixture(scope="session")
def nano() -> TinyGPTV:
    """The bundled default model as every inference command loads it (LoRA merged, eval mode), shared by the tests
    that only read it. A test that changes a model loads its own."""
    return load_model("tinygptv-nano")


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
