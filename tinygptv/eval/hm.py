# Hateful Memes dev: reader for the published JSONL, its prompt, and both scores (accuracy, and AUROC from the
# model's yes/no probability). Data path: dev.jsonl + img/ -> [this reader] -> prompt -> model.generate and the first
# answer token's p(yes), p(no) -> predictions -> [this scorer].
"""Hateful Memes (Kiela et al. 2020), dev split.

Files as published (the Hateful Memes Challenge download; phase 1 has dev.jsonl, phase 2 dev_seen.jsonl and
dev_unseen.jsonl; the seen/unseen ambiguity is a known source of irreproducible numbers, facebookresearch/mmf#900):
    {data}/dev.jsonl           one {id, img: "img/01235.png", label: 0/1, text} per line
    {data}/img/01235.png
`--split` picks dev, dev_seen or dev_unseen; by default dev.jsonl, else dev_seen.jsonl (the summary names the file).

Scores:
- strict: accuracy of the normalised answer being exactly "yes" (hateful, 1) or "no" (0); anything else is wrong.
  Plus AUROC, the challenge's own metric, from p(yes) / (p(yes) + p(no)) of the first answer token (the probability
  mass of the first token of "yes"/"Yes" against that of "no"/"No"), and the accuracy of thresholding it at 0.5.
- tinygptv-compatible: "yes" anywhere in the lower-cased answer -> 1, else "no" anywhere -> 0, else wrong (root
  eval_vqa.py); so "not", "know" and "nothing" read as "no". The paper reports this accuracy, not AUROC.
"""
from __future__ import annotations

from typing import Sequence

from tinygptv.eval.base import (
    BENCHMARKS, COMPATIBLE, binary_label, STRICT, Benchmark, ImageFinder, Item, ItemScore, Loaded, field_of, first_existing,
    image_roots, need_data, percent, read_jsonl,
)
from tinygptv.eval.prompts import prompt_for
from tinygptv.eval.vqa_normalize import normalize_answer

SPLITS = ("dev", "dev_seen", "dev_unseen")
YES_WORDS = ("yes", "Yes")
NO_WORDS = ("no", "No")


class HatefulMemes(Benchmark):
    name = "hm"
    title = "Hateful Memes dev"
    mode = "yesno"

    def read(self, data, *, split=None, images=None, need_images=True) -> Loaded:
        data = need_data(data, self.name)
        if split is not None and split not in SPLITS:
            raise ValueError(f"hm has splits {', '.join(SPLITS)}, not {split!r}")
        names = (f"{split}.jsonl",) if split else ("dev.jsonl", "dev_seen.jsonl")
        path = first_existing(data, names, "Hateful Memes dev annotations")
        finder = ImageFinder(image_roots(data, images, ""), need_images)
        items = []
        for i, row in enumerate(read_jsonl(path)):
            where = f"{path.name}:{i + 1}"
            label = binary_label(row, where)
            items.append(Item(
                id=str(field_of(row, "id", (int, str), where)),
                image=finder.find(field_of(row, "img", str, where)),
                instruction=prompt_for(self.name, text=field_of(row, "text", str, where)),
                target=int(label),
            ))
        return Loaded(items, [path], path.stem, data)

    def score_item(self, item: Item, pred: dict) -> ItemScore:
        answer = self.answer_of(pred)
        strict_label = {"yes": 1, "no": 0}.get(normalize_answer(answer))
        lowered = answer.lower()
        compatible_label = 1 if "yes" in lowered else 0 if "no" in lowered else None
        extra = {}
        p_yes = pred.get("p_yes")
        if isinstance(p_yes, (int, float)) and not isinstance(p_yes, bool):
            extra["likelihood_correct"] = float((p_yes > 0.5) == (item.target == 1))
        return ItemScore(float(strict_label == item.target), float(compatible_label == item.target), extra)

    def summarize(self, items, preds, scores) -> dict:
        out = super().summarize(items, preds, scores)
        p_yes = [p.get("p_yes") for p in preds]
        if p_yes and all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in p_yes):
            auc = auroc([float(p) for p in p_yes], [it.target for it in items])
            out[STRICT]["auroc"] = None if auc is None else 100.0 * auc
            out[STRICT]["likelihood_accuracy"] = percent(s.extra["likelihood_correct"] for s in scores)
        else:
            out[STRICT]["auroc"] = None  # predictions without p_yes (e.g. from another system): no AUROC
        out[COMPATIBLE]["auroc"] = None
        return out


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """Area under the ROC curve as the Mann-Whitney statistic: the probability that a random positive scores above a
    random negative, ties counting one half (ranks of tied scores are averaged). None when a class is absent."""
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    n_pos = sum(1 for y in labels if y == 1)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        mean_rank = (i + j) / 2 + 1  # 1-based ranks i+1 .. j+1, averaged
        for k in range(i, j + 1):
            ranks[order[k]] = mean_rank
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, labels) if y == 1)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


BENCHMARKS.register("hm", HatefulMemes())
