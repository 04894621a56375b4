# VSR zero-shot test split: reader for the published JSONL, its prompt, and both scores.
# Data path: test.jsonl + COCO 2017 images -> [this reader] -> prompt -> model.generate -> predictions -> [this scorer].
"""VSR, Visual Spatial Reasoning (Liu et al. 2023), zero-shot split, test set.

Files as published (Hugging Face dataset `cambridgeltl/vsr_zeroshot`, or `data/splits/zeroshot/` of the VSR GitHub
repository); the images are COCO 2017 train and val images:
    {data}/test.jsonl          one {image, caption, label (1 true / 0 false), relation, ...} per line
    {data}/images/{image}      (or {data}/train2017/{image} and {data}/val2017/{image}, as the official script looks)
The item id is the 0-based line number in test.jsonl (the file has no id field; the summary records its hash).

Scores, per caption (label "true" or "false"):
- strict: the normalised prediction is exactly "true" / "false" and equals the label;
- tinygptv-compatible: the label is a substring of the lower-cased generated text (root eval_vqa.py). The copy of the
  script under TinyGPT-V-main/ also accepted "yes" for true and "no" for false and added the two matches, so one
  caption could count twice (accuracy above 100 % is possible). We report that copy's number as
  `main_copy_double_count` and its intended reading (either word, counted once) as `yes_no_counted_once`, next to
  the root script's `accuracy`.
"""
from __future__ import annotations

from tinygptv.eval.base import (
    BENCHMARKS, COMPATIBLE, binary_label, Benchmark, ImageFinder, Item, ItemScore, Loaded, field_of, first_existing, image_roots,
    need_data, percent, raw_text, read_jsonl,
)
from tinygptv.eval.prompts import prompt_for
from tinygptv.eval.vqa_normalize import normalize_answer

TEST_FILES = ("test.jsonl", "zeroshot/test.jsonl", "splits/zeroshot/test.jsonl")
SYNONYM = {"true": "yes", "false": "no"}


class VSR(Benchmark):
    name = "vsr"
    title = "VSR zero-shot test"

    def read(self, data, *, split=None, images=None, need_images=True) -> Loaded:
        data = need_data(data, self.name)
        path = first_existing(data, TEST_FILES, "VSR zero-shot test.jsonl")
        finder = ImageFinder(image_roots(data, images, "images", "train2017", "val2017", ""), need_images)
        items = []
        for i, row in enumerate(read_jsonl(path)):
            where = f"{path.name}:{i + 1}"
            label = binary_label(row, where)
            items.append(Item(
                id=str(i),
                image=finder.find(field_of(row, "image", str, where)),
                instruction=prompt_for(self.name, caption=field_of(row, "caption", str, where)),
                target="true" if int(label) == 1 else "false",
            ))
        return Loaded(items, [path], "zeroshot test", data)

    def score_item(self, item: Item, pred: dict) -> ItemScore:
        answer = self.answer_of(pred)
        text = raw_text(pred, answer, drop_unk=False).lower()
        label, synonym = item.target, SYNONYM[item.target]
        strict = float(normalize_answer(answer) == label)
        compatible = float(label in text)
        return ItemScore(strict, compatible, {
            "yes_no_counted_once": float(label in text or synonym in text),
            "main_copy_double_count": float(label in text) + float(synonym in text),
        })

    def summarize(self, items, preds, scores) -> dict:
        out = super().summarize(items, preds, scores)
        for key in ("yes_no_counted_once", "main_copy_double_count"):
            out[COMPATIBLE][key] = percent(s.extra[key] for s in scores)
        return out


BENCHMARKS.register("vsr", VSR())
