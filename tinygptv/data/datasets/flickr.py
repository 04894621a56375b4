# Readers for the three Flickr30k grounding sets of stage 4 (MiniGPT-v2's Flickr30k Entities conversions).
# Data path: groundedcaption.json / captiontobbox.json / phrasetobbox.json -> [these readers] -> Sample ->
# batch builder -> model. Images: `{image_root}/{image_id}.jpg`. No text processing anywhere (as in the official).
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import NamedTuple

from tinygptv.data.datasets.base import DATASETS, BadRecords, PathLike, RecordDataset, load_list, need
from tinygptv.data.datasets.sample import Sample
from tinygptv.data.datasets.text import DETECTION_POOL, GROUNDING_POOL


class FlickrRecord(NamedTuple):
    image: str
    fields: tuple[str, ...]  # the values of FIELDS, in order
    source: str


class _Flickr(RecordDataset[FlickrRecord]):
    FIELDS: tuple[str, ...] = ()

    def __init__(self, ann_path: PathLike, image_root: PathLike, *, seed: int = 0, check_images: bool = True):
        path = Path(ann_path)
        records, bad = [], BadRecords()
        for i, rec in enumerate(load_list(path)):
            with bad.record():
                where = f"{path.name}:{i}"
                image_id = need(rec, "image_id", (str, int), where)
                values = tuple(need(rec, key, str, where) for key in self.FIELDS)
                records.append(FlickrRecord(os.path.join(image_root, f"{image_id}.jpg"), values, where))
        super().__init__(records, origin=str(path), seed=seed, check_images=check_images, bad_records=bad)

    def make(self, record: FlickrRecord, rng: random.Random) -> Sample:
        instruction, answer = self.pair(*record.fields, rng=rng)
        return Sample(record.image, [(instruction, answer)], self.task, record.source)

    def pair(self, *fields: str, rng: random.Random) -> tuple[str, str]:
        raise NotImplementedError


@DATASETS.register("flickr_grounded_caption")
class FlickrGroundedCaption(_Flickr):
    """groundedcaption.json {image_id, grounded_caption}: a [grounding] prompt -> the caption with
    `<p>phrase</p> {<..>}` boxes inline."""

    task = "grounding"
    FIELDS = ("grounded_caption",)

    def pair(self, grounded_caption: str, rng: random.Random) -> tuple[str, str]:
        return rng.choice(GROUNDING_POOL), grounded_caption


@DATASETS.register("flickr_CaptionToPhrase")
class FlickrCaptionToPhrase(_Flickr):
    """captiontobbox.json {image_id, caption, output}: "[detection] {caption}" -> `output` (phrases with boxes)."""

    task = "detection"
    FIELDS = ("caption", "output")

    def pair(self, caption: str, output: str, rng: random.Random) -> tuple[str, str]:
        return rng.choice(DETECTION_POOL).format(caption), output


@DATASETS.register("flickr_ObjectToPhrase")
class FlickrObjectToPhrase(_Flickr):
    """phrasetobbox.json {image_id, phrase, bbox} (bbox already a box string): "[detection] {phrase}" ->
    "<p>{phrase}</p> {bbox}"."""

    task = "detection"
    FIELDS = ("phrase", "bbox")

    def pair(self, phrase: str, bbox: str, rng: random.Random) -> tuple[str, str]:
        return rng.choice(DETECTION_POOL).format(phrase), f"<p>{phrase}</p> {bbox}"
