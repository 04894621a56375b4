# IconQA multi-text-choice (choose_txt) val: reader for the published files, its prompt, and both scores. The model
# does not generate here: the runner ranks the candidates by LM loss. Data path: problems.json + pid_splits.json +
# images -> [this reader] -> prompt + each candidate -> per-candidate loss -> chosen candidate -> [this scorer].
"""IconQA (Lu et al. 2021), multi-text-choice sub-task, val split.

Files as published (https://iconqa.github.io, iconqa_data.zip):
    {data}/problems.json      dict pid -> {question, choices: [..], answer: index, ques_type, split, ...}
    {data}/pid_splits.json    dict "choose_txt_val" -> [pid, ...] (and the other sub-task/split lists)
    {data}/iconqa/val/choose_txt/{pid}/image.png
(`--data` may also be the folder that holds iconqa_data/.)

How an answer is chosen (the official `multi_select`): for each candidate the model scores the prompt followed by
the candidate and an end symbol (with the BOS embedding the training forward pass prepends), and the candidate with
the lowest mean token loss over that answer wins. The end symbol is "\n" in a run with the official template: the
official benchmark config sets no end_sym, so MiniGPT-v2's default "\n" was used although stage 4 trained with
"###"; with a model's own template it is that model's end_sym. The official script ran the training forward pass
with batch size 1 because it averages the loss over the batch; we compute each candidate's own mean loss, so
candidates are batched without changing the result. The official prompt here is the stage-3 training template
`###Human: <Img><ImageHere></Img> {prompt} ###Assistant: ` (note the space before ###Assistant), not the
eval template the other benchmarks use, so a run with the "eval" template uses "stage3" for IconQA.

Scores, per question:
- strict: the chosen candidate is the correct one (index equality);
- tinygptv-compatible: the chosen text is a substring of the correct text or the other way round (root
  eval_vqa.py). The official script split the candidate list on "|" although the data joins it with "_", so every
  question had a single "candidate" (and the comparison of a rank index with the answer then failed); the compatible
  score is its intended behaviour: the real candidates, substring match on their texts.
"""
from __future__ import annotations

from tinygptv.data.datasets.sample import DatasetError
from tinygptv.eval.base import (
    BENCHMARKS, Benchmark, ImageFinder, Item, ItemScore, Loaded, field_of, first_existing, image_roots, need_data,
    read_json,
)
from tinygptv.eval.prompts import prompt_for

SPLIT_KEY = "choose_txt_val"


class IconQA(Benchmark):
    name = "iconqa"
    title = "IconQA choose_txt val"
    mode = "rank"
    eval_template = "stage3"
    eval_answer_suffix = "\n"

    def read(self, data, *, split=None, images=None, need_images=True) -> Loaded:
        data = need_data(data, self.name)
        problems_path = first_existing(data, ("problems.json", "iconqa_data/problems.json"), "IconQA problems.json")
        root = problems_path.parent
        splits_path = first_existing(root, ("pid_splits.json",), "IconQA pid_splits.json")
        problems = read_json(problems_path)
        splits = read_json(splits_path)
        if not isinstance(problems, dict):
            raise DatasetError(f"{problems_path}: expected an object mapping problem ids to problems")
        if not isinstance(splits, dict) or SPLIT_KEY not in splits:
            raise DatasetError(f"{splits_path}: no {SPLIT_KEY!r} list")
        finder = ImageFinder(image_roots(root, images, "iconqa/val/choose_txt", "val/choose_txt", ""), need_images)
        items = []
        for pid in splits[SPLIT_KEY]:
            pid = str(pid)
            where = f"{problems_path.name}: problem {pid}"
            if pid not in problems:
                raise DatasetError(f"{splits_path.name}: {SPLIT_KEY} lists {pid}, which is not in {problems_path.name}")
            p = problems[pid]
            ques_type = field_of(p, "ques_type", str, where)
            if ques_type != "choose_txt":
                raise DatasetError(f"{where}: ques_type is {ques_type!r}, expected 'choose_txt'")
            choices = field_of(p, "choices", list, where)
            answer = field_of(p, "answer", int, where)
            if not choices or not all(isinstance(c, str) for c in choices):
                raise DatasetError(f"{where}: field 'choices' must be a non-empty list of strings")
            if not 0 <= answer < len(choices):
                raise DatasetError(f"{where}: answer index {answer} is outside its {len(choices)} choices")
            items.append(Item(
                id=pid,
                image=finder.find(f"{pid}/image.png"),
                instruction=prompt_for(self.name, question=field_of(p, "question", str, where)),
                target=answer,
                candidates=tuple(choices),
            ))
        return Loaded(items, [problems_path, splits_path], SPLIT_KEY, data)

    def score_item(self, item: Item, pred: dict) -> ItemScore:
        chosen_text = self.answer_of(pred)
        choice = pred.get("choice")
        if not isinstance(choice, int) or isinstance(choice, bool):
            # a prediction from elsewhere that names its answer only by text
            choice = item.candidates.index(chosen_text) if chosen_text in item.candidates else -1
        correct = item.candidates[item.target]
        strict = float(choice == item.target)
        compatible = float(chosen_text in correct or correct in chosen_text)
        return ItemScore(strict, compatible)


BENCHMARKS.register("iconqa", IconQA())
