# Readers for RefCOCO / RefCOCO+ / RefCOCOg ([refer]) and their inverse ([identify]) in the REFER layout.
# Data path: refs(*).p + instances.json -> [this reader] -> Sample -> batch builder -> model.
"""Readers for RefCOCO, RefCOCO+ and RefCOCOg in the REFER layout, forward ([refer]: expression -> box) and inverse
([identify]: box -> expression).

Layout (`ann_path` is the REFER root, as in the official configs):
    {ann_path}/refcoco/refs(unc).p   {ann_path}/refcoco+/refs(unc).p   {ann_path}/refcocog/refs(umd).p
    {ann_path}/<dataset>/instances.json      (COCO style: images[{id, width, height}], annotations[{id, bbox}])
    {image_root}/COCO_train2014_{image_id:012d}.jpg
`refs(*).p` is a pickled list of {ref_id, ann_id, image_id, split, sentences: [{raw, ...}], ...}; it is read with a
restricted unpickler (safe_pickle.py). The box is the ref's annotation bbox [x, y, w, h] turned into corners on the
0-100 grid (data.boxes.box_text). The official code divides by the size of the opened image; this reader uses the
width/height recorded in instances.json, which are the same numbers for COCO and need no image decoding.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import NamedTuple

from tinygptv.data.datasets.base import DATASETS, BadRecords, PathLike, RecordDataset, expect, load_json, need
from tinygptv.data.datasets.safe_pickle import load_plain_pickle
from tinygptv.data.datasets.sample import DatasetError, Sample
from tinygptv.data.boxes import box_text
from tinygptv.data.datasets.text import IDENTIFY_POOL, REFER_POOL, blip_caption

SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}


class Ref(NamedTuple):
    image: str
    sentences: tuple[str, ...]  # raw expressions; one is drawn per item
    box: str
    source: str


def in_split(ref_split: str, split: str | None) -> bool:
    """REFER.getRefIds' split rule: "testA"/"testB"/"testC" also match combined splits ("testAB"), "test" matches every
    test split, anything else must match exactly; no split keeps everything."""
    if not split:
        return True
    if split in ("testA", "testB", "testC"):
        return split[-1] in ref_split
    if split == "test":
        return "test" in ref_split
    return ref_split == split


def load_refs(ann_path: PathLike, dataset: str, split_by: str, split: str | None, image_root: PathLike,
              bad: BadRecords) -> list[Ref]:
    folder = Path(ann_path) / dataset
    ref_file = folder / f"refs({split_by}).p"
    refs = expect(load_plain_pickle(ref_file), list, f"{ref_file.name}: top level")
    instances_file = folder / "instances.json"
    instances = load_json(instances_file)
    images = {need(img, "id", int, f"{instances_file.name}: images[{k}]"): img
              for k, img in enumerate(need(instances, "images", list, instances_file.name))}
    anns = {need(ann, "id", int, f"{instances_file.name}: annotations[{k}]"): (k, ann)
            for k, ann in enumerate(need(instances, "annotations", list, instances_file.name))}

    out = []
    for i, ref in enumerate(refs):
        with bad.record():
            where = f"{ref_file.name}:{i}"
            if not in_split(need(ref, "split", str, where), split):
                continue
            image_id, ann_id = need(ref, "image_id", int, where), need(ref, "ann_id", int, where)
            sentences = need(ref, "sentences", list, where)
            if not sentences:
                raise DatasetError(f"{where}: field 'sentences' is empty")
            raws = tuple(need(s, "raw", str, f"{where}: sentences[{k}]") for k, s in enumerate(sentences))
            if ann_id not in anns:
                raise DatasetError(f"{where}: field 'ann_id' {ann_id} is not an annotation of {instances_file}")
            if image_id not in images:
                raise DatasetError(f"{where}: field 'image_id' {image_id} is not an image of {instances_file}")
            k, ann = anns[ann_id]
            bbox = need(ann, "bbox", list, f"{instances_file.name}: annotations[{k}]")
            if len(bbox) != 4:
                raise DatasetError(f"{instances_file.name}: annotations[{k}]: field 'bbox' must have 4 numbers")
            x, y, w, h = (expect(v, (int, float), f"{instances_file.name}: annotations[{k}]: field 'bbox'")
                          for v in bbox)
            img_where = f"{instances_file.name}: image {image_id}"
            width = need(images[image_id], "width", int, img_where)
            height = need(images[image_id], "height", int, img_where)
            if width <= 0 or height <= 0:
                raise DatasetError(f"{img_where}: size {width}x{height} is not positive")
            image = os.path.join(image_root, f"COCO_train2014_{image_id:012d}.jpg")
            out.append(Ref(image, raws, box_text(x, y, x + w, y + h, width, height), where))
    return out


class _ReferBase(RecordDataset[Ref]):
    def __init__(self, ann_path: PathLike, image_root: PathLike, *, dataset: str, split: str | None = "train",
                 split_by: str | None = None, seed: int = 0, check_images: bool = True):
        if dataset not in SPLIT_BY:
            raise ValueError(f"unknown REFER dataset {dataset!r}; known: {', '.join(SPLIT_BY)}")
        split_by = split_by or SPLIT_BY[dataset]
        bad = BadRecords()
        records = load_refs(ann_path, dataset, split_by, split, image_root, bad)
        origin = f"{Path(ann_path) / dataset / f'refs({split_by}).p'} (split {split!r})"
        super().__init__(records, origin=origin, seed=seed, check_images=check_images, bad_records=bad)


class ReferCOCO(_ReferBase):
    """[refer]: the processed expression in a template -> the box string."""

    task = "refer"

    def make(self, record: Ref, rng: random.Random) -> Sample:
        sentence = blip_caption(rng.choice(record.sentences))
        return Sample(record.image, [(rng.choice(REFER_POOL).format(sentence), record.box)], self.task, record.source)


class InvReferCOCO(_ReferBase):
    """[identify]: the box string in a template -> the processed expression."""

    task = "identify"

    def make(self, record: Ref, rng: random.Random) -> Sample:
        sentence = blip_caption(rng.choice(record.sentences))
        return Sample(record.image, [(rng.choice(IDENTIFY_POOL).format(record.box), sentence)], self.task,
                      record.source)


def _builder(cls: type[_ReferBase], dataset: str):
    def build(ann_path: PathLike, image_root: PathLike, **kwargs) -> _ReferBase:
        return cls(ann_path, image_root, dataset=dataset, **kwargs)

    build.__name__ = build.__qualname__ = f"{cls.__name__}[{dataset}]"
    build.__doc__ = f"{cls.__name__} on {dataset} (REFER root `ann_path`, COCO train2014 `image_root`)."
    return build


# The official config keys spell RefCOCO+ as "refcocop"; both spellings are accepted.
for _name, _dataset in (("refcoco", "refcoco"), ("refcoco+", "refcoco+"), ("refcocop", "refcoco+"),
                        ("refcocog", "refcocog")):
    DATASETS.register(_name, _builder(ReferCOCO, _dataset))
    DATASETS.register("inv" + _name, _builder(InvReferCOCO, _dataset))
