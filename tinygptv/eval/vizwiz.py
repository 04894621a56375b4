# VizWiz-VQA val: reader for the published annotations, its prompt, and both scores.
# Data path: val.json + val/ images -> [this reader] -> prompt -> model.generate -> predictions -> [this scorer].
"""VizWiz-VQA (Gurari et al. 2018), val split (4,319 questions, ten answers each).

Files as published (https://vizwiz.org/tasks-and-datasets/vqa/: Annotations.zip, val.zip):
    {data}/val.json     (or {data}/Annotations/val.json) list of {image, question, answers: [{answer,
                        answer_confidence}] x 10, answerable, answer_type}
    {data}/val/{image}  (VizWiz_val_00000000.jpg, ...)
The item id is the image file name (one question per image).

Scores, per question:
- strict: VQA accuracy, min(#matching answers / 3, 1) averaged over the ten leave-one-out subsets of nine, with the
  official normalisation on both sides. "unanswerable" is an ordinary answer string here, as in the official VizWiz
  evaluation.
- tinygptv-compatible: root eval_vqa.py: each of the ten answers counts if it equals the lower-cased prediction, is
  contained in it, or contains it; min(count / 3, 1); no leave-one-out. An empty or one-letter prediction is contained
  in most answers and scores 1. (The official script joined the answers with "_" and split them again, which would
  break an answer containing "_"; we keep the answers as they are. Its saved prediction file kept the raw answer,
  before the "###" cut; the score used the cut answer, as here.)
"""
from __future__ import annotations

from tinygptv.data.datasets.sample import DatasetError
from tinygptv.eval.base import (
    BENCHMARKS, Benchmark, ImageFinder, Item, ItemScore, Loaded, field_of, first_existing, image_roots, need_data,
    read_json,
)
from tinygptv.eval.prompts import prompt_for
from tinygptv.eval.vqa_normalize import vqa_accuracy

ANNOTATIONS = ("val.json", "Annotations/val.json", "annotations/val.json")


class VizWiz(Benchmark):
    name = "vizwiz"
    title = "VizWiz-VQA val"

    def read(self, data, *, split=None, images=None, need_images=True) -> Loaded:
        data = need_data(data, self.name)
        path = first_existing(data, ANNOTATIONS, "VizWiz val annotations")
        records = read_json(path)
        if not isinstance(records, list):
            raise DatasetError(f"{path}: expected a list of questions")
        finder = ImageFinder(image_roots(data, images, "val", "images", "vizwiz_images", ""), need_images)
        items = []
        for i, r in enumerate(records):
            where = f"{path.name}[{i}]"
            image = field_of(r, "image", str, where)
            answers = [field_of(a, "answer", str, f"{where}: answers[{k}]")
                       for k, a in enumerate(field_of(r, "answers", list, where))]
            if not answers:
                raise DatasetError(f"{where}: no answers")
            items.append(Item(
                id=image,
                image=finder.find(image),
                instruction=prompt_for(self.name, question=field_of(r, "question", str, where)),
                target=answers,
            ))
        return Loaded(items, [path], "val", data)

    def score_item(self, item: Item, pred: dict) -> ItemScore:
        answer = self.answer_of(pred)
        return ItemScore(vqa_accuracy(answer, item.target), official_vizwiz_accuracy(answer, item.target))


def official_vizwiz_accuracy(answer: str, answers: list[str]) -> float:
    pred = answer.lower()
    count = sum(1 for gt in answers if gt.lower() == pred or gt.lower() in pred or pred in gt.lower())
    return min(count / 3.0, 1.0)


BENCHMARKS.register("vizwiz", VizWiz())
