# Stage-4 style tasks on the synthetic scenes: [refer] a shape -> its box, [identify] a box -> the shape, [grounding]
# -> every shape with its box, and [vqa] counting, colour, shape and position questions. Train and held-out splits.
# Data path: tinygptv.data.scenes -> [this reader] -> Sample -> batch builder -> model (and the grounding benchmark).
from __future__ import annotations

import random
from typing import NamedTuple

from tinygptv.data.datasets.base import DATASETS, RecordDataset
from tinygptv.data.datasets.sample import Sample
from tinygptv.data.boxes import box_text
from tinygptv.data.datasets.text import GROUNDING_POOL, IDENTIFY_POOL, REFER_POOL, VQA_POOL
from tinygptv.data.scenes import SIZE, Shape, default_root, make_scene, scene_image

TASKS = ("refer", "identify", "grounding", "vqa")
NUMBERS = {2: "two", 3: "three", 4: "four"}


class SceneItem(NamedTuple):
    index: int  # scene
    task: str
    target: int  # which shape (refer/identify), which question (vqa); -1 for grounding


def shape_box(shape: Shape) -> str:
    return box_text(*shape.box, SIZE, SIZE)


def vqa_pairs(shapes: list[Shape]) -> list[tuple[str, str]]:
    """Questions with one right answer in this scene, in the style of easy-VQA's."""
    pairs = [("how many shapes are in the image?", NUMBERS[len(shapes)])]
    kinds = [s.kind for s in shapes]
    colours = [s.colour for s in shapes]
    for s in shapes:
        if kinds.count(s.kind) == 1:
            pairs.append((f"what color is the {s.kind}?", s.colour))
        if colours.count(s.colour) == 1:
            pairs.append((f"what is the {s.colour} shape?", s.kind))
    leftmost = min(shapes, key=lambda s: s.box[0] + s.box[2])
    pairs.append(("which shape is furthest to the left?", leftmost.name))
    return pairs


@DATASETS.register("scenes")
class SceneTasks(RecordDataset[SceneItem]):
    """`count` scenes of a split, each giving one item per shape for refer and identify, one grounding item and one
    item per well-posed question. `tasks` restricts the mix."""

    def __init__(self, split: str = "train", *, count: int = 1000, tasks: list[str] | tuple[str, ...] = TASKS,
                 root: str | None = None, scene_seed: int = 0, seed: int = 0, check_images: bool = True):
        unknown = sorted(set(tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"scenes: unknown task(s) {unknown}; known: {', '.join(TASKS)}")
        self.split, self.scene_seed = split, scene_seed
        self.root = root or str(default_root())
        items = []
        for index in range(count):
            shapes = make_scene(scene_seed, split, index)
            for task in tasks:
                if task in ("refer", "identify"):
                    items += [SceneItem(index, task, k) for k in range(len(shapes))]
                elif task == "grounding":
                    items.append(SceneItem(index, task, -1))
                else:
                    items += [SceneItem(index, task, k) for k in range(len(vqa_pairs(shapes)))]
        super().__init__(items, origin=f"scenes/{split} (seed {scene_seed})", seed=seed, check_images=check_images)

    def make(self, item: SceneItem, rng: random.Random) -> Sample:
        shapes = make_scene(self.scene_seed, self.split, item.index)
        image = scene_image(self.root, self.scene_seed, self.split, item.index)
        source = f"scenes/{self.split}:{item.index}:{item.task}:{item.target}"
        if item.task == "refer":
            shape = shapes[item.target]
            turn = (rng.choice(REFER_POOL).format(f"the {shape.name}"), shape_box(shape))
        elif item.task == "identify":
            shape = shapes[item.target]
            turn = (rng.choice(IDENTIFY_POOL).format(shape_box(shape)), shape.name)
        elif item.task == "grounding":
            ordered = sorted(shapes, key=lambda s: s.box[0])
            parts = [f"<p>a {s.name}</p> {shape_box(s)}" for s in ordered]
            turn = (rng.choice(GROUNDING_POOL), f"There are {NUMBERS[len(shapes)]} shapes: " + ", ".join(parts) + ".")
        else:
            question, answer = vqa_pairs(shapes)[item.target]
            turn = (rng.choice(VQA_POOL).format(question), answer)
        return Sample(image, [turn], item.task, source)
