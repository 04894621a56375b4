# Readers for image-caption annotation files: stage 3's cc_sbu_align and stage 4's textcaps_caption / coco_caption.
# Data path: filter_cap.json / TextCaps_0.1_train.json / coco_karpathy_train.json -> [these readers] -> Sample ->
# batch builder -> model.
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import NamedTuple

from tinygptv.data.datasets.base import (DATASETS, BadRecords, PathLike, RecordDataset, load_json, load_list,
                                         need)
from tinygptv.data.datasets.sample import Sample
from tinygptv.data.datasets.text import ALIGNMENT_PROMPTS, CAPTION_POOL, blip_caption


class Caption(NamedTuple):
    image: str
    caption: str
    source: str


class _CaptionTask(RecordDataset[Caption]):
    """Stage-4 captioning: "[caption] " + one of 17 short-caption prompts -> the blip_caption-processed caption."""

    task = "caption"

    def make(self, record: Caption, rng: random.Random) -> Sample:
        return Sample(record.image, [(rng.choice(CAPTION_POOL), blip_caption(record.caption))], self.task,
                      record.source)


@DATASETS.register("cc_sbu_align")
class CCSBUAlign(RecordDataset[Caption]):
    """MiniGPT-4's ~3.5k curated detailed descriptions (stage 3): `{root}/filter_cap.json` with
    {"annotations": [{"image_id", "caption"}]} and images `{root}/image/{image_id}.jpg`.

    The answer is the raw caption (the official dataset applies no text processor here). The instruction is one of
    the four alignment prompts; the official model picks one prompt per batch, this reader picks one per sample
    (same distribution, and the choice stays reproducible per item)."""

    def __init__(self, root: PathLike, *, ann_path: PathLike | None = None, image_root: PathLike | None = None,
                 seed: int = 0, check_images: bool = True):
        path = Path(ann_path) if ann_path is not None else Path(root) / "filter_cap.json"
        images = Path(image_root) if image_root is not None else Path(root) / "image"
        records, bad = [], BadRecords()
        for i, rec in enumerate(need(load_json(path), "annotations", list, path.name)):
            with bad.record():
                where = f"{path.name}:{i}"
                image_id = need(rec, "image_id", (str, int), where)
                records.append(Caption(str(images / f"{image_id}.jpg"), need(rec, "caption", str, where), where))
        super().__init__(records, origin=str(path), seed=seed, check_images=check_images, bad_records=bad)

    def make(self, record: Caption, rng: random.Random) -> Sample:
        return Sample(record.image, [(rng.choice(ALIGNMENT_PROMPTS), record.caption)], None, record.source)


@DATASETS.register("textcaps_caption")
class TextCapsCaption(_CaptionTask):
    """TextCaps_0.1_train.json: {"data": [{"image_id", "caption_str", ...}]}; image `{image_root}/{image_id}.jpg`."""

    def __init__(self, ann_path: PathLike, image_root: PathLike, *, seed: int = 0, check_images: bool = True):
        path = Path(ann_path)
        records, bad = [], BadRecords()
        for i, rec in enumerate(need(load_json(path), "data", list, path.name)):
            with bad.record():
                where = f"{path.name}:{i}"
                image_id = need(rec, "image_id", (str, int), where)
                caption = need(rec, "caption_str", str, where)
                records.append(Caption(os.path.join(image_root, f"{image_id}.jpg"), caption, where))
        super().__init__(records, origin=str(path), seed=seed, check_images=check_images, bad_records=bad)


@DATASETS.register("coco_caption")
class COCOCaption(_CaptionTask):
    """LAVIS coco_karpathy_train.json: a list of {"image": "train2014/COCO_train2014_...jpg", "caption", ...}.

    As in the official reader, only entries whose `image` contains "train" are kept (the Karpathy train file also
    holds val2014 images that the Karpathy split moved into train), and the image is looked up by its basename under
    `image_root`."""

    def __init__(self, ann_path: PathLike, image_root: PathLike, *, seed: int = 0, check_images: bool = True):
        path = Path(ann_path)
        records, bad = [], BadRecords()
        for i, rec in enumerate(load_list(path)):
            with bad.record():
                where = f"{path.name}:{i}"
                image = need(rec, "image", str, where)
                caption = need(rec, "caption", str, where)
                if "train" in image:
                    records.append(Caption(os.path.join(image_root, image.split("/")[-1]), caption, where))
        super().__init__(records, origin=str(path), seed=seed, check_images=check_images, bad_records=bad)
