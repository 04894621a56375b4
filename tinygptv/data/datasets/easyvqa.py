# easy-VQA (the `easy-vqa` package): 64x64 images of one coloured shape with yes/no, colour and shape questions.
# Its TRAIN split only feeds training: [vqa] questions, and [caption] captions derived from each image's labels.
# Data path: easy_vqa package -> [this reader] -> Sample -> batch builder -> model. (The test split is eval's.)
from __future__ import annotations

import random
import re
from collections import defaultdict
from typing import NamedTuple

from tinygptv.data.datasets.base import DATASETS, RecordDataset
from tinygptv.data.datasets.sample import DatasetError, Sample
from tinygptv.data.datasets.text import CAPTION_POOL, VQA_POOL
from tinygptv.data.scenes import COLOURS as FILLS
from tinygptv.data.scenes import SHAPES

COLOURS = tuple(FILLS)  # easy-VQA's eight colour names, the scenes' palette keys
ANSWER_KINDS = {"yes/no": ("yes", "no"), "colour": COLOURS, "shape": SHAPES}


class EasyRecord(NamedTuple):
    image: str
    question: str  # for captions: "" (unused)
    answer: str
    source: str


def load_split(split: str):
    """(questions, answers, image ids) and id -> path of one split; only "train" may be used for training."""
    import easy_vqa

    if split == "train":
        return easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()
    if split == "test":
        return easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()
    raise ValueError(f"easy-VQA split {split!r}: expected 'train' or 'test'")


def image_labels(questions, answers) -> tuple[str | None, str | None]:
    """An image's colour and shape, read off its own questions ("what color is the triangle?" -> blue)."""
    colour = shape = None
    for q, a in zip(questions, answers):
        if a in COLOURS and q.startswith(("what color", "what is the color")):
            colour = a
            named = re.search(r"(circle|rectangle|triangle)", q)
            shape = shape or (named.group(1) if named else None)
        elif a in SHAPES:
            shape = a
    return colour, shape


class LabelledImage(NamedTuple):
    image: str
    colour: str
    shape: str
    source: str


def labelled_images(split: str) -> list[LabelledImage]:
    """Each image of a split whose colour and shape its own questions give, in image-id order."""
    (questions, answers, ids), paths = load_split(split)
    per_image: dict[int, tuple[list, list]] = defaultdict(lambda: ([], []))
    for q, a, i in zip(questions, answers, ids):
        per_image[i][0].append(q)
        per_image[i][1].append(a)
    out = []
    for i in sorted(per_image):
        colour, shape = image_labels(*per_image[i])
        if colour and shape:
            out.append(LabelledImage(paths[i], colour, shape, f"easy_vqa/{split}:image {i}"))
    return out


def _train_only(split: str) -> None:
    if split != "train":
        raise DatasetError(f"easy-VQA split {split!r} cannot be used for training: only 'train' is (the test split "
                           "is kept for `tinygptv eval --benchmark easyvqa`)")


@DATASETS.register("easyvqa")
class EasyVQA(RecordDataset[EasyRecord]):
    """Every train question, "[vqa] {question}" or the long [vqa] form -> the answer (one of 13 words).

    With questions_per_sample k > 1 a record is one image and a sample a conversation of up to k of its questions
    in random order (the follow-ups in the short form): the image's tokens are paid once for k answers, which
    matters on a CPU.

    kinds: only the questions whose answer is of these kinds ("yes/no", "colour", "shape"), to give one kind a
    larger share of a mix than easy-VQA's own (73 % yes/no, 13 % colour, 13 % shape)."""

    task = "vqa"

    def __init__(self, split: str = "train", *, questions_per_sample: int = 1, limit: int | None = None,
                 kinds: list[str] | None = None, seed: int = 0, check_images: bool = True):
        _train_only(split)
        (questions, answers, ids), paths = load_split(split)
        if kinds is not None:
            unknown = [k for k in kinds if k not in ANSWER_KINDS]
            if unknown or not kinds:
                raise DatasetError(f"easyvqa kinds {kinds!r}: expected a non-empty list of {sorted(ANSWER_KINDS)}")
            allowed = {a for k in kinds for a in ANSWER_KINDS[k]}
            questions, answers, ids = zip(*[x for x in zip(questions, answers, ids) if x[1] in allowed])
        self.per_sample = questions_per_sample
        if questions_per_sample > 1:
            grouped: dict[int, list] = defaultdict(list)
            for q, a, i in zip(questions, answers, ids):
                grouped[i].append((q, a))
            records = [EasyRecord(paths[i], "", "", f"easy_vqa/{split}:image {i}") for i in sorted(grouped)]
            self.questions = {paths[i]: grouped[i] for i in grouped}
        else:
            records = [EasyRecord(paths[i], q, a, f"easy_vqa/{split}:{k}")
                       for k, (q, a, i) in enumerate(zip(questions, answers, ids))]
        super().__init__(records[:limit] if limit else records, origin=f"easy_vqa/{split}", seed=seed,
                         check_images=check_images)

    def make(self, record: EasyRecord, rng: random.Random) -> Sample:
        if self.per_sample == 1:
            chosen = [(record.question, record.answer)]
        else:
            pairs = self.questions[record.image]
            chosen = rng.sample(pairs, min(self.per_sample, len(pairs)))
        return Sample(record.image, vqa_conversation(chosen, rng.choice(VQA_POOL)), self.task, record.source)


def vqa_conversation(pairs: list[tuple[str, str]], first_prompt: str) -> list[tuple[str, str]]:
    """(question, answer) pairs as [vqa] turns: the first in `first_prompt` (a VQA_POOL entry), the follow-ups in
    the short form, as a chat's later questions are asked."""
    return [(first_prompt.format(pairs[0][0]), pairs[0][1])] + [(VQA_POOL[0].format(q), a) for q, a in pairs[1:]]


# easy-VQA's own yes/no phrasings ({} = "red shape" or "circle"): plain, and negated (which flip the answer).
YES_NO_FORMS = ("does the image contain a {}?", "is a {} present?", "is there a {} in the image?", "is there a {}?")
NEGATED_FORMS = ("does the image not contain a {}?", "is no {} present?", "is there not a {} in the image?",
                 "is there not a {}?")


@DATASETS.register("easyvqa_yesno")
class EasyVQAYesNo(RecordDataset[LabelledImage]):
    """Yes/no questions in easy-VQA's phrasings about each train image's own labels, with "yes" and "no" equally
    likely for every phrasing. easy-VQA's own yes/no questions mostly ask about what is absent (7 of 8 colour
    questions answer "no", "yes" when negated), so the question alone gives ~85 % and a model learns to ignore the
    image; balanced, only looking answers them.

    labels_as_text: a text-only sample that says what the image shows instead ("[vqa] The image shows a red
    circle. is there not a red shape?"). Even told the shape in words, SmolLM2-135M answers these at chance (the
    negated forms flip the answer); from text it learns the comparison in ~50 steps, from the image alone not in
    150. Learned first from text, the same LoRA then learns to read it from the image (balanced accuracy
    50 -> 85 % in 60 more steps)."""

    task = "vqa"

    def __init__(self, split: str = "train", *, questions_per_sample: int = 1, labels_as_text: bool = False,
                 seed: int = 0, check_images: bool = True):
        _train_only(split)
        self.per_sample, self.labels_as_text = questions_per_sample, labels_as_text
        super().__init__(labelled_images(split), origin=f"easy_vqa/{split} balanced yes/no", seed=seed,
                         check_images=check_images)

    def make(self, record: LabelledImage, rng: random.Random) -> Sample:
        """questions_per_sample k > 1: a conversation of k independent questions about the image, the follow-ups
        in the short [vqa] form, as `easyvqa` does."""
        pairs = [self._question(record, rng) for _ in range(self.per_sample)]
        if self.labels_as_text:
            (question, answer), said = pairs[0], f"The image shows a {record.colour} {record.shape}. "
            return Sample(None, vqa_conversation([(said + question, answer)] + pairs[1:], VQA_POOL[0]), self.task,
                          record.source)
        return Sample(record.image, vqa_conversation(pairs, rng.choice(VQA_POOL)), self.task, record.source)

    @staticmethod
    def _question(record: LabelledImage, rng: random.Random) -> tuple[str, str]:
        colour, shape = record.colour, record.shape
        present = rng.random() < 0.5
        if rng.random() < 0.5:
            asked = colour if present else rng.choice([c for c in COLOURS if c != colour])
            thing = f"{asked} shape"
        else:
            thing = shape if present else rng.choice([k for k in SHAPES if k != shape])
        negated = rng.random() < 0.5
        question = rng.choice(NEGATED_FORMS if negated else YES_NO_FORMS).format(thing)
        return question, "yes" if present != negated else "no"


@DATASETS.register("easyvqa_caption")
class EasyVQACaptions(RecordDataset[EasyRecord]):
    """One caption per train image, "a {colour} {shape}", from its labels; `instruction: false` gives caption-only
    samples for the warm-up stages, otherwise a [caption] prompt is drawn."""

    task = "caption"

    def __init__(self, split: str = "train", *, instruction: bool = True, seed: int = 0, check_images: bool = True):
        _train_only(split)
        records = [EasyRecord(x.image, "", f"a {x.colour} {x.shape}", x.source) for x in labelled_images(split)]
        self.instruction = instruction
        super().__init__(records, origin=f"easy_vqa/{split} captions", seed=seed, check_images=check_images)

    def make(self, record: EasyRecord, rng: random.Random) -> Sample:
        question = rng.choice(CAPTION_POOL) if self.instruction else None
        return Sample(record.image, [(question, record.answer)], self.task, record.source)
