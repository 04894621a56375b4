# RefCOCO / RefCOCO+ / RefCOCOg referring-expression grounding: reader for the REFER files (every split from its
# own split), the [refer] prompt, box parsing and IoU scoring. Data path: refs(*).p + instances.json + COCO train2014
# images -> [this reader] -> prompt -> model.generate -> "{<x1><y1><x2><y2>}" -> [box parser + IoU] -> Acc@0.5.
"""RefCOCO, RefCOCO+ (UNC splits val / testA / testB) and RefCOCOg (UMD splits val / test).

Files as published (the REFER toolkit's data, https://github.com/lichengunc/refer):
    {data}/refcoco/refs(unc).p  + {data}/refcoco/instances.json
    {data}/refcoco+/refs(unc).p + {data}/refcoco+/instances.json
    {data}/refcocog/refs(umd).p + {data}/refcocog/instances.json
    COCO train2014 images: {data}/images/mscoco/images/train2014/ (REFER's layout), or {data}/train2014/, or --images
Pickles are read with the restricted unpickler (tinygptv.data.datasets.safe_pickle). One item per referring
expression (sentence) of every ref in the split; the expression is REFER's normalised `sent` (its `raw` when a file
has no `sent`). The ground-truth box is the ref's annotation bbox [x, y, w, h] in pixels of the image size recorded in
instances.json.

The model answers with a box on the 0-100 grid, `{<x1><y1><x2><y2>}`. Scores, per expression:
- strict: spaces removed, the first such box anywhere in the answer; corners rescaled by width/100 and height/100;
  continuous IoU with the ground-truth corners; a hit when IoU > 0.5 (strictly greater, as the official script);
- tinygptv-compatible: eval_ref.py: the answer without spaces must *start* with the box (re.match); the official
  "+1 pixel" IoU, (x2 - x1 + 1) * (y2 - y1 + 1) areas; hit when IoU > 0.5. The official script took every integer
  in the answer and silently dropped the answer when there were more than four; we take the box's four.
Official bugs not reproduced: root eval_ref.py read the same annotation file for every split and listed testA/testB
for RefCOCOg; here every split is read from its own split of the REFER file and RefCOCOg has val/test. Its
`--resample` option (re-asking malformed answers) is not offered: it changes the protocol.
"""
from __future__ import annotations

from tinygptv.data.boxes import grid_to_pixels, parse_box
from tinygptv.data.datasets.refer import SPLIT_BY, in_split
from tinygptv.data.datasets.safe_pickle import load_plain_pickle
from tinygptv.data.datasets.sample import DatasetError
from tinygptv.eval.base import (
    BENCHMARKS, COMPATIBLE, STRICT, Benchmark, ImageFinder, Item, ItemScore, Loaded, check_split, field_of,
    image_roots, need_data, percent, raw_text, read_json,
)
from tinygptv.eval.prompts import prompt_for

__all__ = ["grid_to_pixels", "iou", "official_iou", "parse_box", "xywh_to_corners"]


def xywh_to_corners(bbox) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def iou(a, b) -> float:
    """Intersection over union of two corner boxes [x1, y1, x2, y2] (continuous coordinates; an inverted or empty
    box has zero area)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def official_iou(a, b) -> float:
    """MiniGPT-v2's computeIoU: inclusive-pixel areas (+1 on each side). A zero union raised in the official code,
    which skipped the answer; it is 0 here."""
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1) * max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    union = area_a + area_b - inter
    return inter / union if union != 0 else 0.0


class RefCOCO(Benchmark):
    mode = "generate"

    def __init__(self, dataset: str, splits: tuple[str, ...], title: str):
        self.name = dataset
        self.splits = splits
        self.title = title

    def read(self, data, *, split=None, images=None, need_images=True) -> Loaded:
        data = need_data(data, self.name)
        splits = check_split(self, split)
        folder = data / self.name
        ref_file = folder / f"refs({SPLIT_BY[self.name]}).p"
        inst_file = folder / "instances.json"
        for f in (ref_file, inst_file):
            if not f.is_file():
                raise FileNotFoundError(f"{f}: REFER file not found (expected {{data}}/{self.name}/{f.name})")
        refs = load_plain_pickle(ref_file)
        if not isinstance(refs, list):
            raise DatasetError(f"{ref_file}: expected a list of refs")
        instances = read_json(inst_file)
        sizes = {}
        for k, img in enumerate(field_of(instances, "images", list, inst_file.name)):
            where = f"{inst_file.name}: images[{k}]"
            sizes[field_of(img, "id", int, where)] = (field_of(img, "width", int, where),
                                                       field_of(img, "height", int, where))
        boxes = {}
        for k, ann in enumerate(field_of(instances, "annotations", list, inst_file.name)):
            where = f"{inst_file.name}: annotations[{k}]"
            bbox = field_of(ann, "bbox", list, where)
            if len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
                raise DatasetError(f"{where}: field 'bbox' must be 4 numbers")
            boxes[field_of(ann, "id", int, where)] = [float(v) for v in bbox]
        finder = ImageFinder(image_roots(data, images, "images/mscoco/images/train2014", "train2014",
                                         "images/train2014", ""), need_images)
        items = []
        for split_name in splits:  # each split read from its own refs, in turn
            for i, ref in enumerate(refs):
                where = f"{ref_file.name}[{i}]"
                if not in_split(field_of(ref, "split", str, where), split_name):
                    continue
                image_id = field_of(ref, "image_id", int, where)
                ann_id = field_of(ref, "ann_id", int, where)
                if image_id not in sizes or ann_id not in boxes:
                    raise DatasetError(f"{where}: image {image_id} or annotation {ann_id} is not in {inst_file.name}")
                width, height = sizes[image_id]
                image = finder.find(f"COCO_train2014_{image_id:012d}.jpg")
                ref_id = ref.get("ref_id", i)
                for k, s in enumerate(field_of(ref, "sentences", list, where)):
                    sw = f"{where}: sentences[{k}]"
                    sentence = s.get("sent") if isinstance(s, dict) and isinstance(s.get("sent"), str) else None
                    sentence = sentence if sentence is not None else field_of(s, "raw", str, sw)
                    sent_id = s.get("sent_id", k) if isinstance(s, dict) else k
                    items.append(Item(
                        id=f"{split_name}/{ref_id}/{sent_id}",
                        image=image,
                        instruction=prompt_for("refcoco", sentence=sentence),
                        target={"bbox": boxes[ann_id], "width": width, "height": height},
                        group=split_name,
                    ))
        return Loaded(items, [ref_file, inst_file], "+".join(splits), data)

    def score_item(self, item: Item, pred: dict) -> ItemScore:
        answer = self.answer_of(pred)
        t = item.target
        gt = xywh_to_corners(t["bbox"])
        strict = compatible = 0.0
        box = parse_box(answer)
        if box is not None:
            strict = float(iou(grid_to_pixels(box, t["width"], t["height"]), gt) > 0.5)
        official_box = parse_box(raw_text(pred, answer), anchored=True)
        if official_box is not None:
            compatible = float(official_iou(grid_to_pixels(official_box, t["width"], t["height"]), gt) > 0.5)
        return ItemScore(strict, compatible)

    def summarize(self, items, preds, scores) -> dict:
        out = super().summarize(items, preds, scores)
        for split_name in self.splits:
            chosen = [s for it, s in zip(items, scores) if it.group == split_name]
            if chosen:
                out[STRICT][split_name] = percent(s.strict for s in chosen)
                out[COMPATIBLE][split_name] = percent(s.compatible for s in chosen)
        return out


BENCHMARKS.register("refcoco", RefCOCO("refcoco", ("val", "testA", "testB"), "RefCOCO (UNC) val/testA/testB"))
BENCHMARKS.register("refcoco+", RefCOCO("refcoco+", ("val", "testA", "testB"), "RefCOCO+ (UNC) val/testA/testB"))
BENCHMARKS.register("refcocog", RefCOCO("refcocog", ("val", "test"), "RefCOCOg (UMD) val/test"))
