# Reader for `refvg`: Visual Genome region descriptions as [refer] samples.
# Data path: region_descriptions.json + image_data.json -> [this reader] -> Sample -> batch builder -> model.
"""Reader for `refvg`: Visual Genome region descriptions as [refer] samples (phrase -> box).

The official reader goes through the `visual_genome.local` API; this one reads the same two published files
directly, with the same field rules:
    {data_dir}/image_data.json           [{"image_id" (or "id"), "width", "height", "url", ...}]
    {data_dir}/region_descriptions.json  [{"id": image id, "regions": [{"phrase", "x", "y", "width", "height", ...}]}]
    {data_dir}/<last two segments of the image url>, e.g. VG_100K/2345.jpg
Only regions smaller than 16384 px (width * height, the OFA practice the official code follows) are kept. The box
is taken relative to the width/height in image_data.json (the official code uses the opened image's size, which
is the same for VG) and, like the official one, is not clipped to the image.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import NamedTuple

from tinygptv.data.datasets.base import DATASETS, BadRecords, PathLike, RecordDataset, expect, load_list, need
from tinygptv.data.datasets.sample import DatasetError, Sample
from tinygptv.data.boxes import box_text
from tinygptv.data.datasets.text import REFER_POOL, blip_caption

MAX_REGION_AREA = 16384


class VGImage(NamedTuple):
    path: str
    width: int
    height: int


class Region(NamedTuple):
    image: int  # index into the dataset's image table
    phrase: str
    x: float
    y: float
    width: float
    height: float
    entry: int  # record index in region_descriptions.json (kept as ints: VG has millions of regions)
    position: int  # index in that record's `regions`


def load_images(path: Path, data_dir: PathLike, bad: BadRecords) -> dict[int, VGImage]:
    images = {}
    for i, rec in enumerate(load_list(path)):
        with bad.record():
            where = f"{path.name}:{i}"
            image_id = need(rec, "id" if "id" in expect(rec, dict, where) else "image_id", int, where)
            width, height = need(rec, "width", int, where), need(rec, "height", int, where)
            if width <= 0 or height <= 0:
                raise DatasetError(f"{where}: size {width}x{height} is not positive")
            url = need(rec, "url", str, where)
            images[image_id] = VGImage(os.path.join(data_dir, *url.split("/")[-2:]), width, height)
    return images


@DATASETS.register("refvg")
class ReferVisualGenome(RecordDataset[Region]):
    task = "refer"

    def __init__(self, data_dir: PathLike, *, ann_path: PathLike | None = None, image_data_path: PathLike | None = None,
                 seed: int = 0, check_images: bool = True):
        path = Path(ann_path) if ann_path is not None else Path(data_dir) / "region_descriptions.json"
        bad = BadRecords()
        by_id = load_images(Path(image_data_path) if image_data_path else Path(data_dir) / "image_data.json", data_dir,
                            bad)
        self.file_name = path.name
        self.images: list[VGImage] = []
        slot: dict[int, int] = {}
        records = []
        for i, rec in enumerate(load_list(path)):
            with bad.record():
                where = f"{path.name}:{i}"
                image_id = need(rec, "id", int, where)
                if image_id not in by_id:
                    raise DatasetError(f"{where}: field 'id' {image_id} is not an image of image_data.json")
                for k, region in enumerate(need(rec, "regions", list, where)):
                    with bad.record():
                        rwhere = f"{where}[{k}]"
                        x, y, w, h = (need(region, key, (int, float), rwhere)
                                      for key in ("x", "y", "width", "height"))
                        phrase = need(region, "phrase", str, rwhere)
                        if w * h < MAX_REGION_AREA:
                            if image_id not in slot:
                                slot[image_id] = len(self.images)
                                self.images.append(by_id[image_id])
                            records.append(Region(slot[image_id], phrase, x, y, w, h, i, k))
        super().__init__(records, origin=str(path), seed=seed, check_images=check_images, bad_records=bad)

    def make(self, record: Region, rng: random.Random) -> Sample:
        image = self.images[record.image]
        box = box_text(record.x, record.y, record.x + record.width, record.y + record.height, image.width, image.height)
        instruction = rng.choice(REFER_POOL).format(blip_caption(record.phrase))
        source = f"{self.file_name}:{record.entry}[{record.position}]"
        return Sample(image.path, [(instruction, box)], self.task, source)
