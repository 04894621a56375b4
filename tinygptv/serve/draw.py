# Grounding answers drawn onto the image: every "{<x1><y1><x2><y2>}" box (0-100 grid) in an answer, with the phrase
# of a "<p>phrase</p> {box}" pair as its label. The last step of `tinygptv ask --draw OUT.png` and of the web demo.
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from tinygptv.data.boxes import boxes_in, grid_to_pixels
from tinygptv.data.image_file import open_image

PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def draw_boxes(image_path: str | Path, answer: str, out: str | Path) -> int:
    """Writes the image with the answer's boxes to `out`; returns how many boxes were drawn."""
    image, drawn = draw_on(open_image(image_path), answer)  # upright, as the model saw it
    image.save(out)
    return drawn


def draw_on(image: Image.Image, answer: str) -> tuple[Image.Image, int]:
    """An RGB copy of `image` with the answer's boxes drawn on it, and how many there were. In memory, for the web
    demo; `draw_boxes` wraps it for files."""
    image = image.convert("RGB")  # always a copy, so the caller's image stays clean
    pen = ImageDraw.Draw(image)
    found = boxes_in(answer)
    width = max(2, round(min(image.size) / 150))
    for k, (phrase, box) in enumerate(found):
        colour = PALETTE[k % len(PALETTE)]
        x1, y1, x2, y2 = grid_to_pixels(box, *image.size)
        pen.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        if phrase:
            pen.text((x1 + width, y1 + width), phrase, fill=colour)
    return image, len(found)
