# The nano model's own data: easy-VQA's train split (never its test split) as questions, conversations and derived
# captions, and synthetic scenes whose boxes, answers and held-out split are deterministic and right.
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from tinygptv.data.datasets import build_dataset
from tinygptv.data.datasets.easyvqa import image_labels
from tinygptv.data.datasets.sample import DatasetError
from tinygptv.data.datasets.text import VQA_POOL
from tinygptv.data.scenes import COLOURS, make_scene, scene_image


def test_easyvqa_trains_only_on_the_train_split():
    with pytest.raises(DatasetError, match="'test' cannot be used for training"):
        build_dataset("easyvqa", split="test")
    ds = build_dataset("easyvqa", limit=50, seed=3)
    sample = ds[7]
    assert "/train/" in sample.image.replace("\\", "/")
    instruction, answer = sample.turns[0]
    assert any(instruction == pool.format(instruction.split(": ", 1)[-1].replace("[vqa] ", "")) for pool in VQA_POOL)
    assert answer in {"yes", "no", "circle", "rectangle", "triangle", *COLOURS}


def test_easyvqa_conversations_group_one_image():
    ds = build_dataset("easyvqa", questions_per_sample=4, seed=0)
    assert len(ds) == 4000  # one record per train image
    sample = ds[0]
    assert 2 <= len(sample.turns) <= 4
    assert all(q.startswith("[vqa] ") for q, _ in sample.turns)
    assert ds[0].turns == sample.turns  # deterministic per (seed, index, epoch)


def test_easyvqa_kinds_keep_only_those_answers():
    colours = build_dataset("easyvqa", questions_per_sample=5, kinds=["colour"], seed=0)
    answers = [a for k in range(50) for _, a in colours[k].turns]
    assert set(answers) <= set(COLOURS) and len(set(answers)) > 3
    assert any(len(colours[k].turns) > 1 for k in range(50))  # images with two colour questions keep both
    naming = build_dataset("easyvqa", kinds=["colour", "shape"], seed=0)
    assert {"circle", "red"} <= {naming[k].turns[0][1] for k in range(len(naming))} <= \
        {"circle", "rectangle", "triangle", *COLOURS}
    with pytest.raises(DatasetError, match="kinds.*'colour'"):
        build_dataset("easyvqa", kinds=["color"])


def test_caption_labels_come_from_the_image_questions():
    qs = ["what color is the triangle?", "is there a red shape?"]
    assert image_labels(qs, ["blue", "no"]) == ("blue", "triangle")
    assert image_labels(["what shape is in the image?", "what color is the shape?"], ["circle", "red"]) == \
        ("red", "circle")
    ds = build_dataset("easyvqa_caption", instruction=False)
    sample = ds[0]
    assert sample.turns[0][0] is None and sample.turns[0][1].startswith("a ")


def test_balanced_yes_no_questions_are_right_and_even():
    """Each answer follows the image's own labels (negation flips it), and no phrasing predicts the answer alone."""
    from collections import Counter

    from tinygptv.data.datasets.easyvqa import labelled_images

    labels = {x.image: (x.colour, x.shape) for x in labelled_images("train")}
    ds = build_dataset("easyvqa_yesno", seed=0)
    assert len(ds) == len(labels) > 2800  # images whose questions name both colour and shape
    by_form = Counter()
    conversations = build_dataset("easyvqa_yesno", seed=0, questions_per_sample=3)
    singles = [ds[i] for i in range(0, len(ds), 3)]
    samples = singles + [conversations[i] for i in range(0, len(ds), 30)]
    assert all(len(s.turns) == 1 for s in singles) and all(len(s.turns) == 3 for s in samples[len(singles):])
    for sample in samples:
        colour, shape = labels[sample.image]
        for question, answer in sample.turns:
            asked = question.rsplit(": ", 1)[-1].removeprefix("[vqa] ")
            thing = re.search(r"a (\w+ shape|circle|rectangle|triangle)", asked.replace("no ", "a ")).group(1)
            present = thing in (f"{colour} shape", shape)
            negated = re.search(r"\b(not|no)\b", asked) is not None
            assert answer == ("yes" if present != negated else "no"), (question, colour, shape)
            form = re.sub(r"\w+ shape|circle|rectangle|triangle", "X", asked)
            by_form[(form, answer)] += 1
    for form in {f for f, _ in by_form}:
        yes, no = by_form[(form, "yes")], by_form[(form, "no")]
        assert 0.3 < yes / (yes + no) < 0.7, (form, yes, no)
    with pytest.raises(DatasetError, match="only 'train'"):
        build_dataset("easyvqa_yesno", split="test")


def test_yes_no_with_labels_as_text_is_the_same_question_with_the_image_in_words():
    """The text form must ask exactly what the image form asks, with the image's own labels said before the
    question, so what the LoRA learns from words is the comparison it needs on the image."""
    from tinygptv.data.datasets.easyvqa import labelled_images

    labels = {x.source: (x.colour, x.shape) for x in labelled_images("train")}
    images = build_dataset("easyvqa_yesno", seed=3, questions_per_sample=2)
    texts = build_dataset("easyvqa_yesno", seed=3, questions_per_sample=2, labels_as_text=True)
    for i in range(0, len(images), 97):
        pictured, worded = images[i], texts[i]
        assert worded.image is None and pictured.image is not None
        colour, shape = labels[worded.source]
        question = pictured.turns[0][0].rsplit(": ", 1)[-1].removeprefix("[vqa] ")
        assert worded.turns[0] == (f"[vqa] The image shows a {colour} {shape}. {question}", pictured.turns[0][1])
        assert worded.turns[1:] == pictured.turns[1:] and worded.task == "vqa"


def test_scenes_are_deterministic_and_held_out_differs():
    assert make_scene(0, "train", 5) == make_scene(0, "train", 5)
    train = [make_scene(0, "train", i) for i in range(20)]
    test = [make_scene(0, "test", i) for i in range(20)]
    assert train != test
    for shapes in train:
        names = [s.name for s in shapes]
        assert len(set(names)) == len(names)  # every refer expression is unambiguous


def test_scene_boxes_match_the_pixels(tmp_path):
    shapes = make_scene(0, "train", 3)
    image = Image.open(scene_image(tmp_path, 0, "train", 3)).convert("RGB")
    for s in shapes:
        x1, y1, x2, y2 = s.box
        cx, cy = (x1 + x2) // 2, (y1 + y2) // 2 + (y2 - y1) // 4  # inside every shape kind (low centre)
        assert image.getpixel((cx, cy)) == COLOURS[s.colour]
        assert image.getpixel((max(0, x1 - 3), max(0, y1 - 3))) != COLOURS[s.colour]


def test_scene_colours_are_easy_vqa_colours():
    """A colour name must mean the same fill in both training sets (other shades made the model's colour answers on
    easy-VQA depend on which set it saw last)."""
    from collections import Counter

    from tinygptv.data.datasets.easyvqa import labelled_images

    seen = {}
    for record in labelled_images("train")[:200]:
        pixels = Counter(map(tuple, np.asarray(Image.open(record.image).convert("RGB")).reshape(-1, 3).tolist()))
        seen.setdefault(record.colour, Counter())[pixels.most_common(2)[1][0]] += 1  # [0] is the background
    assert set(seen) == set(COLOURS)
    assert {name: fills.most_common(1)[0][0] for name, fills in seen.items()} == COLOURS


def test_scene_tasks_give_boxes_on_the_0_100_grid(tmp_path):
    ds = build_dataset("scenes", count=3, tasks=["refer", "identify", "grounding"], root=str(tmp_path))
    by_task = {}
    for i in range(len(ds)):
        by_task.setdefault(ds[i].task, ds[i])
    shapes = make_scene(0, "train", 0)
    refer_q, refer_a = by_task["refer"].turns[0]
    assert refer_q.startswith("[refer] ")
    target = next(s for s in shapes if s.name in refer_q)
    x1, y1, x2, y2 = target.box
    grid = [int(v / 224 * 100) for v in (x1, y1, x2, y2)]  # the official int(x / width * 100)
    assert refer_a == "{<%d><%d><%d><%d>}" % tuple(grid)
    ident_q, ident_a = by_task["identify"].turns[0]
    assert ident_q.startswith("[identify] ") and ident_a in [s.name for s in shapes]
    _, grounded = by_task["grounding"].turns[0]
    assert grounded.count("<p>") == len(shapes)
    with pytest.raises(ValueError, match="unknown task"):
        build_dataset("scenes", count=1, tasks=["dance"], root=str(tmp_path))
