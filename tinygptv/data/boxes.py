# Boxes as TinyGPT-V writes them in text: "{<x1><y1><x2><y2>}" on a 0-100 grid of the image, optionally after a
# "<p>phrase</p>" label. Data path: pixel boxes -> [box_text] -> training answers; model answers -> [parse_box,
# boxes_in] -> pixel boxes for scoring (eval) and drawing (ask --draw, the web demo).
from __future__ import annotations

import re

GRID = 100.0  # the official --res: boxes are written on a 0-100 grid of the image
BOX = re.compile(r"\{<(\d{1,3})><(\d{1,3})><(\d{1,3})><(\d{1,3})>\}")
BOX_WITH_PHRASE = re.compile(r"(?:<p>([^<]*)</p>\s*)?\{<(\d+)><(\d+)><(\d+)><(\d+)>\}")


def box_text(x1: float, y1: float, x2: float, y2: float, width: float, height: float) -> str:
    """Corners in pixels -> "{<x1><y1><x2><y2>}" on the 0-100 grid, with the official arithmetic
    (`int(x / width * 100)`, division first, truncation), so the strings match what the model was trained on."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    grid = [int(x1 / width * 100), int(y1 / height * 100), int(x2 / width * 100), int(y2 / height * 100)]
    return "{{<{}><{}><{}><{}>}}".format(*grid)


def parse_box(answer: str, anchored: bool = False) -> tuple[int, int, int, int] | None:
    """The four grid numbers of `{<x1><y1><x2><y2>}` in the answer, spaces removed first; anchored=True requires the
    box at the very start (the official re.match)."""
    text = answer.replace(" ", "").strip()
    m = BOX.match(text) if anchored else BOX.search(text)
    return tuple(int(g) for g in m.groups()) if m else None


def boxes_in(answer: str) -> list[tuple[str, tuple[int, int, int, int]]]:
    """Every (phrase, grid box) of an answer; the phrase is "" for a box without a <p>label</p>."""
    return [(m.group(1) or "", tuple(int(g) for g in m.groups()[1:])) for m in BOX_WITH_PHRASE.finditer(answer)]


def grid_to_pixels(box, width: float, height: float) -> list[float]:
    x1, y1, x2, y2 = box
    return [x1 / GRID * width, y1 / GRID * height, x2 / GRID * width, y2 / GRID * height]
