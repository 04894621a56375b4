# The dataset readers of the four training stages and their registry (DATASETS, build_dataset).
# Data path: dataset files -> [readers in this package] -> Sample -> batch builder -> model.
"""Dataset readers for the four TinyGPT-V training stages.

Each reader turns one dataset, in its publisher's file layout, into `Sample`s (image path, (instruction, answer)
turns, task tag). Names in `DATASETS` are the official config keys:

stage 1-2  laion, cc_sbu (webdataset shards, iterable)
stage 3    cc_sbu_align
stage 4    llava_conversation, multitask_conversation, llava_detail, llava_reason, unnatural_instruction,
           coco_vqa, ok_vqa, aok_vqa, gqa, ocrvqa, textcaps_caption, coco_caption,
           refcoco, refcoco+ (alias refcocop), refcocog, invrefcoco, invrefcoco+ (invrefcocop), invrefcocog, refvg,
           flickr_grounded_caption, flickr_CaptionToPhrase, flickr_ObjectToPhrase
ours       llava_json (LLaVA-style fine-tuning JSON); for the nano model: easyvqa, easyvqa_caption (easy-VQA's
           train split), scenes (synthetic shapes with boxes: refer, identify, grounding, vqa)

    ds = build_dataset("coco_vqa", ann_path=["vqa_train.json", "vqa_val.json"], image_root="coco/train2014", seed=42)
    ds.set_epoch(3); sample = ds[17]

Map-style readers are deterministic given (seed, index, epoch); see base.RecordDataset.
"""
from __future__ import annotations

from typing import Any

# importing the reader modules registers their datasets
from tinygptv.data.datasets import (captions, easyvqa, flickr, llava, refer, scenes,  # noqa: F401
                                   unnatural, visual_genome, vqa, webdataset)
from tinygptv.data.datasets.base import DATASETS, RecordDataset
from tinygptv.data.datasets.sample import DatasetError, Sample
from tinygptv.data.boxes import box_text
from tinygptv.data.datasets.text import blip_caption
from tinygptv.data.datasets.webdataset import CaptionShards


def build_dataset(name: str, on_bad_record: str = "stop", **kwargs: Any):
    """The dataset a recipe names, built from the recipe's keyword arguments (e.g. ann_path, image_root, seed).
    A map-style reader sets malformed records aside (`bad_records`); with on_bad_record "stop" the first of them is
    raised here, with "skip" the dataset is returned without them."""
    if on_bad_record not in ("stop", "skip"):
        raise ValueError(f"on_bad_record: {on_bad_record!r} is not 'stop' or 'skip'")
    dataset = DATASETS[name](**kwargs)
    bad = getattr(dataset, "bad_records", [])
    if bad and on_bad_record == "stop":
        raise bad[0]
    return dataset


__all__ = ["DATASETS", "CaptionShards", "DatasetError", "RecordDataset", "Sample", "blip_caption", "box_text",
           "build_dataset"]
