# Grounding on held-out synthetic scenes: "[refer] give me the location of the {colour} {shape}" -> a box, scored
# Acc@IoU>=0.5 against the shape's drawn box. Scenes come from the "test" stream, which training never reads.
# Data path: tinygptv.data.scenes (split "test") -> [this reader] -> prompt -> model.generate -> [refcoco's scorer].
"""scenes: the grounding check of the models trained here (README, model card). `--data` is not used: scene i of
the held-out split is drawn from (seed 0, "test", i); `--limit` picks how many items (default: 200 scenes, one item per
shape). strict: IoU >= 0.5 with the box parsed anywhere in the answer; tinygptv-compatible: the official RefCOCO rule
(the whole answer must be the box, IoU > 0.5)."""
from __future__ import annotations

from tinygptv.data.scenes import SIZE, default_root, make_scene, scene_image
from tinygptv.eval.base import BENCHMARKS, Benchmark, Item, ItemScore, Loaded, raw_text
from tinygptv.eval.prompts import prompt_for
from tinygptv.data.boxes import grid_to_pixels, parse_box
from tinygptv.eval.refcoco import iou, official_iou

SCENES = 200


class HeldOutScenes(Benchmark):
    name = "scenes"
    title = "held-out synthetic scenes, [refer] Acc@IoU>=0.5"
    needs_data = False

    def read(self, data=None, *, split=None, images=None, need_images=True) -> Loaded:
        root = images or default_root()
        items = []
        for index in range(SCENES):
            shapes = make_scene(0, "test", index)
            image = scene_image(root, 0, "test", index) if need_images else ""
            for k, shape in enumerate(shapes):
                items.append(Item(id=f"{index}/{k}", image=image,
                                  instruction=prompt_for("refcoco", sentence=f"the {shape.name}"),
                                  target={"box": list(shape.box)}))
        return Loaded(items, [], "test (seed 0)")

    def score_item(self, item: Item, pred: dict) -> ItemScore:
        answer = self.answer_of(pred)
        gt = item.target["box"]
        box = parse_box(answer)
        strict = float(box is not None and iou(grid_to_pixels(box, SIZE, SIZE), gt) >= 0.5)
        official = parse_box(raw_text(pred, answer), anchored=True)
        compatible = float(official is not None and official_iou(grid_to_pixels(official, SIZE, SIZE), gt) > 0.5)
        return ItemScore(strict, compatible)


BENCHMARKS.register("scenes", HeldOutScenes())
