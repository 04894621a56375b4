# GQA testdev-balanced: reader for the published questions file, its prompt, and both scores.
# Data path: testdev_balanced_questions.json + images/ -> [this reader] -> prompt -> model.generate -> predictions ->
# [this scorer].
"""GQA (Hudson & Manning 2019), testdev-balanced, 12,578 questions.

Files as published (https://cs.stanford.edu/people/dorarad/gqa/download.html: questions1.2.zip, images.zip):
    {data}/testdev_balanced_questions.json   dict question id -> {imageId, question, answer, fullAnswer, ...}
    {data}/images/{imageId}.jpg
(`questions/` and `gqa_images/` sub-folders are accepted too.)

Scores, per question:
- strict: the normalised prediction equals the normalised answer (GQA has one answer per question);
- tinygptv-compatible: the answer is a substring of the lower-cased prediction, as in TinyGPT-V's eval_vqa.py
  (MiniGPT-v2's script, which it copied, used exact match). "no" is found in "not" and "know", so this is looser.
  The official script searched the whole generated text, without cutting it at "###"; we search the raw output we
  kept, which stops at "###" unless the run used --no-stop (then it is the official text exactly).
"""
from __future__ import annotations

from tinygptv.eval.base import (
    BENCHMARKS, Benchmark, ImageFinder, Item, ItemScore, Loaded, field_of, first_existing, image_roots, need_data,
    raw_text, read_json,
)
from tinygptv.data.datasets.sample import DatasetError
from tinygptv.eval.prompts import prompt_for
from tinygptv.eval.vqa_normalize import normalize_answer

QUESTIONS = ("testdev_balanced_questions.json", "questions/testdev_balanced_questions.json")


class GQA(Benchmark):
    name = "gqa"
    title = "GQA testdev-balanced"

    def read(self, data, *, split=None, images=None, need_images=True) -> Loaded:
        data = need_data(data, self.name)
        path = first_existing(data, QUESTIONS, "GQA testdev-balanced questions")
        questions = read_json(path)
        if not isinstance(questions, dict):
            raise DatasetError(f"{path}: expected an object mapping question ids to questions")
        finder = ImageFinder(image_roots(data, images, "images", "gqa_images", ""), need_images)
        items = []
        for qid, q in questions.items():
            where = f"{path.name}: question {qid}"
            image_id = field_of(q, "imageId", str, where)
            items.append(Item(
                id=str(qid),
                image=finder.find(f"{image_id}.jpg"),
                instruction=prompt_for(self.name, question=field_of(q, "question", str, where)),
                target=field_of(q, "answer", str, where),
            ))
        return Loaded(items, [path], "testdev-balanced", data)

    def score_item(self, item: Item, pred: dict) -> ItemScore:
        answer = self.answer_of(pred)
        strict = float(normalize_answer(answer) == normalize_answer(item.target))
        compatible = float(item.target in raw_text(pred, answer, drop_unk=False).lower())
        return ItemScore(strict, compatible)


BENCHMARKS.register("gqa", GQA())
