# Readers for the [vqa] sets of stage 4: coco_vqa / ok_vqa (LAVIS format), aok_vqa, gqa and ocrvqa.
# Data path: vqa_train.json / okvqa_train.json / aokvqa_v1p0_train.json / train_balanced_questions.json /
# dataset.json -> [these readers] -> Sample -> batch builder -> model.
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import NamedTuple, Sequence

from tinygptv.data.datasets.base import (DATASETS, BadRecords, PathLike, RecordDataset, as_paths, expect, load_json,
                                         load_list, need)
from tinygptv.data.datasets.sample import DatasetError, Sample
from tinygptv.data.datasets.text import VQA_POOL, blip_caption


class Question(NamedTuple):
    image: str
    question: str
    answers: tuple[str, ...]  # candidates, repeats kept: the answer is drawn with probability count / len
    source: str


def weighted_answer(answers: Sequence[str], rng: random.Random) -> str:
    """One answer, drawn with probability proportional to how many annotators gave it (the official COCO-VQA /
    A-OKVQA weighting), so the model learns the consensus answer most often but still sees the alternatives."""
    counts: dict[str, int] = {}
    for answer in answers:
        counts[answer] = counts.get(answer, 0) + 1
    return rng.choices(list(counts), weights=list(counts.values()), k=1)[0]


def _answers(rec: dict, key: str, where: str) -> tuple[str, ...]:
    answers = need(rec, key, list, where)
    if not answers:
        raise DatasetError(f"{where}: field {key!r} is empty")
    return tuple(expect(a, str, f"{where}: field {key!r}[{k}]") for k, a in enumerate(answers))


class _VQA(RecordDataset[Question]):
    """"[vqa] ..." with the processed question -> the processed answer (drawn by frequency when there are several)."""

    task = "vqa"

    def make(self, record: Question, rng: random.Random) -> Sample:
        instruction = rng.choice(VQA_POOL).format(blip_caption(record.question))
        answer = blip_caption(weighted_answer(record.answers, rng))
        return Sample(record.image, [(instruction, answer)], self.task, record.source)


class _DropsMissingImages(_VQA):
    """COCO-style VQA files whose records point at images by `image`; looked up by basename under `image_root`.
    Records whose image file does not exist are dropped when the dataset is built, as the official readers do;
    `missing_images` counts them."""

    ANSWER_KEY = "answer"

    def __init__(self, ann_path: PathLike | Sequence[PathLike], image_root: PathLike, *, seed: int = 0,
                 check_images: bool = True):
        paths = as_paths(ann_path)
        records, bad, self.missing_images = [], BadRecords(), 0
        for path in paths:
            for i, rec in enumerate(load_list(path)):
                with bad.record():
                    where = f"{path.name}:{i}"
                    image = os.path.join(image_root, need(rec, "image", str, where).split("/")[-1])
                    question = need(rec, "question", str, where)
                    answers = _answers(rec, self.ANSWER_KEY, where)
                    if os.path.isfile(image):
                        records.append(Question(image, question, answers, where))
                    else:
                        self.missing_images += 1
        origin = ", ".join(str(p) for p in paths)
        if not records and self.missing_images:
            raise DatasetError(f"{origin}: no usable records ({self.missing_images} dropped because their image is "
                               f"not in {image_root})")
        super().__init__(records, origin=origin, seed=seed, check_images=check_images, bad_records=bad)


@DATASETS.register("coco_vqa")
class COCOVQA(_DropsMissingImages):
    """LAVIS vqa_train.json + vqa_val.json: lists of {question_id, question, answer: [...], image}."""


DATASETS.register("ok_vqa", COCOVQA)  # OK-VQA ships in the same LAVIS format (okvqa_train.json)


@DATASETS.register("aok_vqa")
class AOKVQA(_DropsMissingImages):
    """LAVIS aokvqa_v1p0_train.json: {question, direct_answers: [...], image, ...}; the answer is drawn from
    `direct_answers` by frequency (choices and rationales are unused, as in the official reader)."""

    ANSWER_KEY = "direct_answers"


@DATASETS.register("gqa")
class GQA(_VQA):
    """LAVIS train_balanced_questions.json: a list of {image, question, answer (one string)};
    image `{image_root}/{image}`."""

    def __init__(self, ann_path: PathLike, image_root: PathLike, *, seed: int = 0, check_images: bool = True):
        path = Path(ann_path)
        records, bad = [], BadRecords()
        for i, rec in enumerate(load_list(path)):
            with bad.record():
                where = f"{path.name}:{i}"
                image = os.path.join(image_root, need(rec, "image", str, where))
                records.append(Question(image, need(rec, "question", str, where), (need(rec, "answer", str, where),),
                                        where))
        super().__init__(records, origin=str(path), seed=seed, check_images=check_images, bad_records=bad)


@DATASETS.register("ocrvqa")
class OCRVQA(_VQA):
    """OCR-VQA dataset.json: a dict keyed by book id, each {imageURL, questions: [...], answers: [...], split, ...};
    `split` 1 = train, 2 = val, 3 = test. One sample per (question, answer) pair; image `{image_root}/{id}{ext}`
    with the extension of `imageURL`.

    The official reader retries the next index when an image is missing; this one raises a DatasetError naming the
    record instead (silently substituting another item would skew sampling and hide a broken download)."""

    def __init__(self, ann_path: PathLike, image_root: PathLike, *, split: int = 1, seed: int = 0,
                 check_images: bool = True):
        path = Path(ann_path)
        data = expect(load_json(path), dict, f"{path.name}: top level")
        records, bad = [], BadRecords()
        for key, rec in data.items():
            with bad.record():
                where = f"{path.name}:{key}"
                if need(rec, "split", int, where) != split:
                    continue
                ext = os.path.splitext(need(rec, "imageURL", str, where))[1]
                questions, answers = need(rec, "questions", list, where), need(rec, "answers", list, where)
                if len(questions) != len(answers):
                    raise DatasetError(f"{where}: fields 'questions' and 'answers' differ in length "
                                       f"({len(questions)} vs {len(answers)})")
                for j, (q, a) in enumerate(zip(questions, answers)):
                    records.append(Question(os.path.join(image_root, f"{key}{ext}"),
                                            expect(q, str, f"{where}: field 'questions'[{j}]"),
                                            (expect(a, str, f"{where}: field 'answers'[{j}]"),), f"{where}[{j}]"))
        super().__init__(records, origin=str(path), seed=seed, check_images=check_images, bad_records=bad)
