# Synthetic scenes: a few coloured shapes with known boxes, drawn deterministically from (seed, split, index). They
# give the stage-4 tasks ([refer], [identify], [grounding], counting / colour / position [vqa]) real targets offline.
# Data path: (seed, split, index) -> [scene + PNG] -> datasets/scenes.py -> Sample -> batch builder -> model.
from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from tinygptv.atomic import replacing

SIZE = 224
SHAPES = ("circle", "rectangle", "triangle")  # easy-VQA's shapes and colour names
# easy-VQA's own fill for each colour name (read from its train images). Other shades under the same names made the
# two training sets disagree: easy-VQA's brown (165, 42, 42) is nearly a red (214, 39, 40) drawn here before, and
# the nano model's colour answers on easy-VQA swung between 21 % and 99 % with the order of stage-4 batches.
COLOURS = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0),
    "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (165, 42, 42), "yellow": (255, 255, 0),
}
# Cached PNGs are keyed by the palette too, so a changed palette never reuses images drawn with the old one.
PALETTE_TAG = hashlib.sha1(repr(sorted(COLOURS.items())).encode()).hexdigest()[:8]
SPLIT_SALT = {"train": 0, "test": 1}  # held-out scenes come from another stream, never from train's


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels of the SIZE x SIZE image

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


def make_scene(seed: int, split: str, index: int) -> list[Shape]:
    """2-4 shapes, distinct (colour, shape) pairs, no overlaps; the same arguments give the same scene."""
    if split not in SPLIT_SALT:
        raise ValueError(f"scene split {split!r}: expected one of {sorted(SPLIT_SALT)}")
    rng = random.Random(f"scenes:{seed}:{SPLIT_SALT[split]}:{index}")
    count = rng.randint(2, 4)
    pairs = rng.sample([(c, k) for c in COLOURS for k in SHAPES], count)
    shapes: list[Shape] = []
    for colour, kind in pairs:
        for _ in range(200):
            side = rng.randint(40, 84)
            x1, y1 = rng.randint(4, SIZE - side - 4), rng.randint(4, SIZE - side - 4)
            box = (x1, y1, x1 + side, y1 + side)
            if all(_apart(box, s.box) for s in shapes):
                shapes.append(Shape(colour, kind, box))
                break
    return shapes


def _apart(a, b, gap: int = 6) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def draw_scene(shapes: list[Shape]) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (246, 244, 238))
    pen = ImageDraw.Draw(image)
    for s in shapes:
        x1, y1, x2, y2 = s.box
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            pen.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
        elif s.kind == "rectangle":
            pen.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
        else:
            pen.polygon([((x1 + x2) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=fill)
    return image


def scene_image(root: str | os.PathLike, seed: int, split: str, index: int) -> str:
    """The scene's PNG under root (drawn once, written atomically), so images have paths like any dataset's."""
    path = Path(root) / f"seed{seed}-{PALETTE_TAG}" / split / f"{index:06d}.png"
    if not path.is_file():
        with replacing(path) as tmp:
            draw_scene(make_scene(seed, split, index)).save(tmp, format="PNG")
    return str(path)


def default_root() -> Path:
    return Path(os.environ.get("TINYGPTV_CACHE", Path.home() / ".cache" / "tinygptv")) / "scenes"
