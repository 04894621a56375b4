# OK-VQA val: reader for the VQA-format questions and annotations, its prompt, and both scores.
# Data path: questions + annotations JSON + COCO val2014 images -> [this reader] -> prompt -> model.generate ->
# predictions -> [this scorer].
"""OK-VQA (Marino et al. 2019), val split (the split published with answers; 5,046 questions, ten answers each).

Files as published (https://okvqa.allenai.org/download.html), in the VQA v2 format:
    {data}/OpenEnded_mscoco_val2014_questions.json   {questions: [{image_id, question, question_id}]}
    {data}/mscoco_val2014_annotations.json           {annotations: [{question_id, image_id, answers: [{answer, ...}]}]}
    {data}/val2014/COCO_val2014_{image_id:012d}.jpg  (COCO 2014 val images)
The "_clean" files MiniGPT-v2 prepared (`..._questions_clean.json`, `..._annotations_clean.json`) are read when the
published names are absent. The official TinyGPT-V script asked only the questions of MiniGPT-v2's
`okvqa_test_split.json`; we ask every question of the files given.

Scores, per question:
- strict: VQA accuracy (min(#matches / 3, 1) over the ten leave-one-out subsets) with the official normalisation
  applied to the prediction and to every answer;
- tinygptv-compatible: what TinyGPT-V's script ran: its copy of the VQA evaluation tool (MiniGPT-4's), on the answer
  lower-cased with "<unk>" removed: both sides fully normalised when the ten answers disagree, neither when they
  agree, compared without case. (The VQA tool's public master differs: vqa_normalize.official_vqa_accuracy.)
"""
from __future__ import annotations

from tinygptv.data.datasets.sample import DatasetError
from tinygptv.eval.base import (
    BENCHMARKS, Benchmark, ImageFinder, Item, ItemScore, Loaded, field_of, first_existing, image_roots, need_data,
    read_json,
)
from tinygptv.eval.prompts import prompt_for
from tinygptv.eval.vqa_normalize import tinygptv_vqa_accuracy, vqa_accuracy

QUESTIONS = ("OpenEnded_mscoco_val2014_questions.json", "OpenEnded_mscoco_val2014_questions_clean.json")
ANNOTATIONS = ("mscoco_val2014_annotations.json", "mscoco_val2014_annotations_clean.json")


class OKVQA(Benchmark):
    name = "okvqa"
    title = "OK-VQA val"

    def read(self, data, *, split=None, images=None, need_images=True) -> Loaded:
        data = need_data(data, self.name)
        q_path = first_existing(data, QUESTIONS, "OK-VQA questions")
        a_path = first_existing(data, ANNOTATIONS, "OK-VQA annotations")
        questions = field_of(read_json(q_path), "questions", list, q_path.name)
        annotations = field_of(read_json(a_path), "annotations", list, a_path.name)
        answers_by_qid = {}
        for i, ann in enumerate(annotations):
            where = f"{a_path.name}: annotations[{i}]"
            qid = field_of(ann, "question_id", int, where)
            answers_by_qid[qid] = [field_of(a, "answer", str, f"{where}: answers[{k}]")
                                   for k, a in enumerate(field_of(ann, "answers", list, where))]
        finder = ImageFinder(image_roots(data, images, "val2014", "images/val2014", ""), need_images)
        items = []
        for i, q in enumerate(questions):
            where = f"{q_path.name}: questions[{i}]"
            qid = field_of(q, "question_id", int, where)
            if not answers_by_qid.get(qid):
                raise DatasetError(f"{where}: question {qid} has no answers in {a_path.name}")
            image_id = field_of(q, "image_id", int, where)
            items.append(Item(
                id=str(qid),
                image=finder.find(f"COCO_val2014_{image_id:012d}.jpg"),
                instruction=prompt_for(self.name, question=field_of(q, "question", str, where)),
                target=answers_by_qid[qid],
            ))
        return Loaded(items, [q_path, a_path], "val2014", data)

    def score_item(self, item: Item, pred: dict) -> ItemScore:
        answer = self.answer_of(pred)
        return ItemScore(vqa_accuracy(answer, item.target), tinygptv_vqa_accuracy(answer.lower(), item.target))


BENCHMARKS.register("okvqa", OKVQA())
