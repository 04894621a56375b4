# Readers for LLaVA-style conversation JSON: the official stage-4 sets and our own fine-tuning format.
# Data path: LLaVA-style JSON -> [these readers] -> Sample (multi-turn) -> batch builder -> model.
"""Readers for conversation-style annotations: the official stage-4 LLaVA / MiniGPT-v2 sets and our own fine-tuning
format.

Official sets (image `{image_root}/COCO_train2014_{id}.jpg`, record `{"id", "conversations": [{"from", "value"}]}`):
- `llava_conversation` (conversation_58k.json), `multitask_conversation` (multitask_conversation.json): every turn
  kept; the first human turn loses its "<image>" markers and all "\\n"; no text processing.
- `llava_detail` (detail_23k.json), `llava_reason` (complex_reasoning_77k.json): first question (cleaned the same
  way, then blip_caption-processed) -> first answer (raw).
Turns are read by position, as the official code does (even = question, odd = answer); a trailing question with no
answer is dropped.

Our fine-tuning format, `llava_json` (the LLaVA layout most public instruction sets use), a JSON list of:
    {"image": "relative/or/absolute/path.jpg",        # optional: without it the record is text-only
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."},
                       {"from": "human", "value": "What colour is it?"},
                       {"from": "gpt", "value": "Black."}]}
Roles must alternate human, gpt, ... and end with gpt. "<image>" markers are removed (the image always goes with
the first turn) and each text is stripped; newlines inside a text are kept. Relative image paths are resolved
against `image_root` (default: the JSON file's folder). No task tag, no text processing.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import NamedTuple

from tinygptv.data.datasets.base import DATASETS, BadRecords, PathLike, RecordDataset, expect, load_list, need
from tinygptv.data.datasets.sample import DatasetError, Sample
from tinygptv.data.datasets.text import blip_caption

IMAGE_MARKER = "<image>"


class Dialogue(NamedTuple):
    image: str | None
    turns: tuple[tuple[str, str], ...]
    source: str


class _Dialogues(RecordDataset[Dialogue]):
    def make(self, record: Dialogue, rng: random.Random) -> Sample:
        return Sample(record.image, list(record.turns), None, record.source)


def _texts(rec: dict, where: str) -> list[str]:
    """The `value` of every entry of `conversations`, checked."""
    conversations = need(rec, "conversations", list, where)
    texts = [need(turn, "value", str, f"{where}: conversations[{k}]") for k, turn in enumerate(conversations)]
    if len(texts) < 2:
        raise DatasetError(f"{where}: field 'conversations' needs at least a question and an answer")
    return texts


def _official_first(text: str) -> str:
    return text.replace(IMAGE_MARKER, "").replace("\n", "").strip()


class _OfficialLlava(_Dialogues):
    """Shared parsing of the official sets; `multi_turn` and `process_question` select the variant."""

    multi_turn = True
    process_question = False

    def __init__(self, ann_path: PathLike, image_root: PathLike, *, seed: int = 0, check_images: bool = True):
        path = Path(ann_path)
        records, bad = [], BadRecords()
        for i, rec in enumerate(load_list(path)):
            with bad.record():
                where = f"{path.name}:{i}"
                image_id = need(rec, "id", (str, int), where)
                texts = _texts(rec, where)
                first = _official_first(texts[0])
                if self.process_question:
                    first = blip_caption(first)
                texts[0] = first
                pairs = len(texts) // 2 if self.multi_turn else 1
                turns = tuple((texts[2 * k], texts[2 * k + 1]) for k in range(pairs))
                records.append(Dialogue(os.path.join(image_root, f"COCO_train2014_{image_id}.jpg"), turns, where))
        super().__init__(records, origin=str(path), seed=seed, check_images=check_images, bad_records=bad)


@DATASETS.register("llava_conversation")
class LlavaConversation(_OfficialLlava):
    """LLaVA conversation_58k.json: multi-turn, raw text."""


@DATASETS.register("multitask_conversation")
class MultitaskConversation(_OfficialLlava):
    """MiniGPT-v2 multitask_conversation.json: multi-turn, raw text."""


@DATASETS.register("llava_detail")
class LlavaDetail(_OfficialLlava):
    """LLaVA detail_23k.json: processed first question -> raw first answer."""

    multi_turn = False
    process_question = True


@DATASETS.register("llava_reason")
class LlavaReason(_OfficialLlava):
    """LLaVA complex_reasoning_77k.json: processed first question -> raw first answer."""

    multi_turn = False
    process_question = True


@DATASETS.register("llava_json")
class LlavaJson(_Dialogues):
    """Our fine-tuning format (see the module docstring)."""

    ROLES = ("human", "gpt")

    def __init__(self, ann_path: PathLike, image_root: PathLike | None = None, *, seed: int = 0,
                 check_images: bool = True):
        path = Path(ann_path)
        root = Path(image_root) if image_root is not None else path.parent
        records, bad = [], BadRecords()
        for i, rec in enumerate(load_list(path)):
            with bad.record():
                where = f"{path.name}:{i}"
                image = None
                if expect(rec, dict, where).get("image") is not None:
                    image = str(root / need(rec, "image", str, where))  # an absolute path wins over root
                texts = _texts(rec, where)
                for k, turn in enumerate(rec["conversations"]):
                    role = need(turn, "from", str, f"{where}: conversations[{k}]")
                    if role != self.ROLES[k % 2]:
                        raise DatasetError(f"{where}: field 'conversations[{k}].from' is {role!r}, expected "
                                           f"{self.ROLES[k % 2]!r} (turns alternate human, gpt)")
                if len(texts) % 2:
                    raise DatasetError(f"{where}: field 'conversations' ends with a question that has no answer")
                texts = [t.replace(IMAGE_MARKER, "").strip() for t in texts]
                turns = tuple((texts[k], texts[k + 1]) for k in range(0, len(texts), 2))
                records.append(Dialogue(image, turns, where))
        super().__init__(records, origin=str(path), seed=seed, check_images=check_images, bad_records=bad)
