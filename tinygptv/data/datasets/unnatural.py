# Reader for the text-only stage-4 set `unnatural_instruction` (MiniGPT-v2's filtered_unnatural_instruction.json).
# Data path: JSON list of {"instances": [{"instruction_with_input", "constraints", "output"}]} -> [this reader] ->
# Sample (image None) -> batch builder -> model.
from __future__ import annotations

import random
from pathlib import Path
from typing import NamedTuple

from tinygptv.data.datasets.base import DATASETS, BadRecords, PathLike, RecordDataset, load_list, need
from tinygptv.data.datasets.sample import DatasetError, Sample
from tinygptv.data.datasets.text import blip_caption


class Instruction(NamedTuple):
    instruction: str
    output: str
    source: str


@DATASETS.register("unnatural_instruction")
class UnnaturalInstruction(RecordDataset[Instruction]):
    """`instances[0].instruction_with_input` (+ " " + `constraints` when not null) -> `instances[0].output`, both
    blip_caption-processed, as the official reader does (so the answers are lowercased and lose their punctuation:
    a faithful quirk). No image and no task tag."""

    def __init__(self, ann_path: PathLike, *, seed: int = 0):
        path = Path(ann_path)
        records, bad = [], BadRecords()
        for i, rec in enumerate(load_list(path)):
            with bad.record():
                where = f"{path.name}:{i}"
                instances = need(rec, "instances", list, where)
                if not instances:
                    raise DatasetError(f"{where}: field 'instances' is empty")
                first = f"{where}: instances[0]"
                instruction = need(instances[0], "instruction_with_input", str, first)
                constraints = need(instances[0], "constraints", (str, type(None)), first)
                if constraints is not None:
                    instruction = instruction + " " + constraints
                records.append(Instruction(instruction, need(instances[0], "output", str, first), where))
        super().__init__(records, origin=str(path), seed=seed, check_images=False, bad_records=bad)

    def make(self, record: Instruction, rng: random.Random) -> Sample:
        return Sample(None, [(blip_caption(record.instruction), blip_caption(record.output))], None, record.source)
