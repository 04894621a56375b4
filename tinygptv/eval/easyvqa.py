# easy-VQA test split, read from the `easy-vqa` package: its reader, prompt and both scores. Not a paper benchmark:
# the one real VQA set that installs offline, used to score the models trained here. Data path: the package's
# questions.json + PNGs -> [this reader] -> prompt -> model.generate -> predictions -> [this scorer].
"""easy-VQA (Victor Zhou, `pip install easy-vqa`): 64x64 synthetic shapes, 9,673 test questions over 1,000 images,
13 possible one-word answers (shapes, colours, yes/no). `--data` is not used: the files come with the package; the
summary hashes its data/test/questions.json.

Prompt: the [vqa] short-answer prompt of GQA / OK-VQA. max_new_tokens 10 (every answer is one word).
Scores, per question:
- strict: normalised exact match with the answer;
- tinygptv-compatible: the answer is a substring of the lower-cased prediction, the rule TinyGPT-V's script applies to
  the other one-answer set, GQA (so "no" inside "not" or "know" counts).
Both are also given per kind of answer (yes/no, colour, shape), where a model's weaknesses show.
"""
from __future__ import annotations

from pathlib import Path

from tinygptv.data.datasets.easyvqa import ANSWER_KINDS
from tinygptv.eval.base import BENCHMARKS, COMPATIBLE, STRICT, Benchmark, Item, ItemScore, Loaded, percent, raw_text
from tinygptv.eval.prompts import prompt_for
from tinygptv.eval.vqa_normalize import normalize_answer


class EasyVQA(Benchmark):
    name = "easyvqa"
    title = "easy-VQA test"
    max_new_tokens = 10
    needs_data = False

    def read(self, data=None, *, split=None, images=None, need_images=True) -> Loaded:
        try:
            import easy_vqa
        except ImportError:
            raise FileNotFoundError("the easyvqa benchmark needs the easy-vqa package (pip install easy-vqa)") from None
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths() if need_images else {}
        if need_images and images is not None:
            paths = {k: str(Path(images) / Path(p).name) for k, p in paths.items()}
        items = []
        for i, (question, answer, image_id) in enumerate(zip(questions, answers, image_ids)):
            if need_images and image_id not in paths:
                raise FileNotFoundError(f"easy-vqa test image {image_id} is missing from the package")
            items.append(Item(
                id=str(i),
                image=paths.get(image_id, ""),
                instruction=prompt_for(self.name, question=question),
                target=answer,
                group=answer_kind(answer),
            ))
        package = Path(easy_vqa.__file__).parent / "data"
        return Loaded(items, [package / "test" / "questions.json", package / "answers.txt"], "test",
                      package.parent.parent)

    def score_item(self, item: Item, pred: dict) -> ItemScore:
        answer = self.answer_of(pred)
        strict = float(normalize_answer(answer) == normalize_answer(item.target))
        compatible = float(item.target in raw_text(pred, answer).lower())
        return ItemScore(strict, compatible)


    def summarize(self, items, preds, scores) -> dict:
        out = super().summarize(items, preds, scores)
        for kind in ANSWER_KINDS:
            chosen = [s for it, s in zip(items, scores) if answer_kind(it.target) == kind]
            if chosen:
                out[STRICT][kind] = percent(s.strict for s in chosen)
                out[COMPATIBLE][kind] = percent(s.compatible for s in chosen)
        return out


def answer_kind(answer: str) -> str:
    """yes/no, colour or shape: the three kinds of easy-VQA's 13 answers."""
    return next((kind for kind, answers in ANSWER_KINDS.items() if answer in answers), "other")


BENCHMARKS.register("easyvqa", EasyVQA())
