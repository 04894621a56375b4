# Writers for tiny benchmark files in each publisher's real layout (GQA, VSR, IconQA, VizWiz, Hateful Memes, OK-VQA,
# REFER), and the hand-worked predictions with their expected scores, for test_eval.py.
# Data path they feed: these files -> eval readers -> runner / scorer.
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

from PIL import Image


def image(path: Path, size: tuple[int, int] = (12, 8), fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 40, 40)).save(path, format=fmt)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def gqa(root: Path) -> Path:
    """testdev_balanced_questions.json (dict qid -> question) + images/{imageId}.jpg"""
    def q(image_id, question, answer):
        return {"semantic": [], "entailed": [], "equivalent": [], "question": question, "imageId": image_id,
                "isBalanced": True, "groups": {"global": None, "local": "x"}, "answer": answer,
                "semanticStr": "", "annotations": {}, "types": {"structural": "query"}, "fullAnswer": answer}
    write_json(root / "testdev_balanced_questions.json", {
        "g1": q("n1", "What color is the car?", "red"),
        "g2": q("n1", "Is there a dog?", "no"),
        "g3": q("n2", "How many cats are there?", "2"),
        "g4": q("n2", "What is on the table?", "laptop"),
    })
    for name in ("n1", "n2"):
        image(root / "images" / f"{name}.jpg")
    return root


def vsr(root: Path) -> Path:
    """test.jsonl (HF cambridgeltl/vsr_zeroshot); images in COCO 2017 train2017/ and val2017/."""
    rows = [
        {"image": "000000000001.jpg", "image_link": "http://x", "caption": "The cat is on the bed.", "label": 1,
         "relation": "on", "subj": "cat", "obj": "bed", "annotator_id": 0, "vote_true_validator_id": [],
         "vote_false_validator_id": []},
        {"image": "000000000002.jpg", "image_link": "http://x", "caption": "The dog is under the car.", "label": 0,
         "relation": "under", "subj": "dog", "obj": "car", "annotator_id": 1, "vote_true_validator_id": [],
         "vote_false_validator_id": []},
        {"image": "000000000001.jpg", "image_link": "http://x", "caption": "The bed is below the cat.", "label": 1,
         "relation": "below", "subj": "bed", "obj": "cat", "annotator_id": 2, "vote_true_validator_id": [],
         "vote_false_validator_id": []},
    ]
    write_jsonl(root / "test.jsonl", rows)
    image(root / "train2017" / "000000000001.jpg")
    image(root / "val2017" / "000000000002.jpg")
    return root


def iconqa(root: Path) -> Path:
    """iconqa_data/: problems.json + pid_splits.json + iconqa/{split}/choose_txt/{pid}/image.png"""
    def p(question, choices, answer, split, ques_type="choose_txt"):
        return {"question": question, "choices": choices, "answer": answer, "ques_type": ques_type,
                "grade": "grade1", "label": "", "split": split, "skills": []}
    problems = {
        "p1": p("How many dots are there?", ["3", "4", "5"], 1, "val"),
        "p2": p("Which shape is this?", ["circle", "square"], 0, "val"),
        "p3": p("How many sticks?", ["10", "1"], 0, "val"),
        "t1": p("Train question?", ["a", "b"], 0, "train"),
        "f1": p("Fill in the blank", [], 0, "val", "fill_in_blank"),
    }
    write_json(root / "problems.json", problems)
    write_json(root / "pid_splits.json", {"choose_txt_train": ["t1"], "choose_txt_val": ["p1", "p2", "p3"],
                                          "choose_txt_test": [], "fill_in_blank_val": ["f1"]})
    for pid in ("p1", "p2", "p3"):
        image(root / "iconqa" / "val" / "choose_txt" / pid / "image.png", fmt="PNG")
    return root


def vizwiz(root: Path) -> Path:
    """val.json (list of questions with ten answers) + val/VizWiz_val_*.jpg"""
    def rec(i, question, answers, answerable=1):
        return {"image": f"VizWiz_val_{i:08d}.jpg", "question": question, "answerable": answerable,
                "answer_type": "other",
                "answers": [{"answer": a, "answer_confidence": "yes"} for a in answers]}
    records = [
        rec(0, "What is this?", ["unanswerable"] * 6 + ["blurry"] * 2 + ["dark", "unsuitable"], 0),
        rec(1, "How many coins?", ["2", "2", "two"] + ["3"] * 7),
        rec(2, "Is the light on?", ["yes"] * 10),
    ]
    write_json(root / "val.json", records)
    for r in records:
        image(root / "val" / r["image"])
    return root


def hm(root: Path) -> Path:
    """dev.jsonl ({id, img, label, text}) + img/*.png"""
    rows = [{"id": 1, "img": "img/00001.png", "label": 1, "text": "first meme"},
            {"id": 2, "img": "img/00002.png", "label": 0, "text": "second meme"},
            {"id": 3, "img": "img/00003.png", "label": 0, "text": "third meme"},
            {"id": 4, "img": "img/00004.png", "label": 1, "text": "fourth meme"}]
    write_jsonl(root / "dev.jsonl", rows)
    for r in rows:
        image(root / r["img"], fmt="PNG")
    return root


def okvqa(root: Path) -> Path:
    """OpenEnded_mscoco_val2014_questions.json + mscoco_val2014_annotations.json + val2014/COCO_val2014_*.jpg"""
    questions = [{"image_id": 42, "question": "What animal is this?", "question_id": 420},
                 {"image_id": 42, "question": "How many legs?", "question_id": 421},
                 {"image_id": 7, "question": "What is he wearing?", "question_id": 70}]
    answers = {420: ["dog"] * 10, 421: ["two"] * 10, 70: ["t-shirt"] * 4 + ["shirt"] * 6}
    annotations = [{"image_id": q["image_id"], "question_id": q["question_id"], "question_type": "other",
                    "answer_type": "other", "confidence": 3,
                    "answers": [{"answer_id": k + 1, "raw_answer": a, "answer_confidence": "yes", "answer": a}
                                for k, a in enumerate(answers[q["question_id"]])]} for q in questions]
    write_json(root / "OpenEnded_mscoco_val2014_questions.json",
               {"info": {}, "license": {}, "data_subtype": "val2014", "task_type": "Open-Ended",
                "data_type": "mscoco", "questions": questions})
    write_json(root / "mscoco_val2014_annotations.json",
               {"info": {}, "license": {}, "data_subtype": "val2014", "data_type": "mscoco",
                "annotations": annotations})
    for image_id in (42, 7):
        image(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
    return root


def _ref(ref_id, ann_id, image_id, split, *sents):
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "category_id": 1,
            "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg", "sent_ids": [s[0] for s in sents],
            "sentences": [{"sent_id": sid, "raw": raw, "sent": raw.lower(), "tokens": raw.lower().split()}
                          for sid, raw in sents]}


def refer(root: Path) -> Path:
    """REFER root: {dataset}/refs(unc|umd).p + instances.json; COCO train2014 images under images/mscoco/images/.
    Image 1 is 100 x 100 so the 0-100 grid equals pixels and the hand-worked IoUs are exact."""
    images = [{"id": 1, "width": 100, "height": 100, "file_name": "COCO_train2014_000000000001.jpg"},
              {"id": 2, "width": 200, "height": 100, "file_name": "COCO_train2014_000000000002.jpg"}]
    annotations = [{"id": 10, "image_id": 1, "bbox": [0, 0, 50, 50], "category_id": 1, "area": 2500},
                   {"id": 11, "image_id": 1, "bbox": [50, 50, 50, 50], "category_id": 1, "area": 2500},
                   {"id": 12, "image_id": 2, "bbox": [20, 10, 80, 40], "category_id": 1, "area": 3200}]
    unc = [_ref(0, 10, 1, "val", (100, "Left Dog"), (101, "the dog")),
           _ref(1, 11, 1, "testA", (102, "right cat")),
           _ref(2, 12, 2, "testB", (103, "red car")),
           _ref(3, 12, 2, "train", (104, "train only"))]
    umd = [_ref(5, 10, 1, "val", (200, "the dog on the left")),
           _ref(6, 12, 2, "test", (201, "a red car")),
           _ref(7, 11, 1, "train", (202, "train only"))]
    for dataset, split_by, refs in (("refcoco", "unc", unc), ("refcoco+", "unc", unc), ("refcocog", "umd", umd)):
        folder = root / dataset
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"refs({split_by}).p", "wb") as f:
            pickle.dump(refs, f, protocol=2)  # the REFER files are Python-2 pickles
        write_json(folder / "instances.json", {"images": images, "annotations": annotations,
                                               "categories": [{"id": 1, "name": "thing"}]})
    for img in images:
        image(root / "images" / "mscoco" / "images" / "train2014" / img["file_name"], (img["width"], img["height"]))
    return root


WRITERS = {"gqa": gqa, "vsr": vsr, "iconqa": iconqa, "vizwiz": vizwiz, "hm": hm, "okvqa": okvqa,
           "refcoco": refer, "refcoco+": refer, "refcocog": refer}


# --- hand-worked predictions and their scores (percent) -------------------------------------------------------------
# Each entry: benchmark -> (prediction records, expected {score: {metric: value}}). The reasoning is in the comments.

HAND_WORKED: dict[str, tuple[list[dict], dict[str, dict[str, float]]]] = {
    "gqa": ([
        {"id": "g1", "answer": "Red."},                 # strict 1 (trailing period); compatible 1
        {"id": "g2", "answer": "I don't know"},         # strict 0; compatible 1: "no" is inside "know"
        {"id": "g3", "answer": "two"},                  # strict 1 (two -> 2); compatible 0 ("2" not in "two")
        {"id": "g4", "answer": "the laptop computer"},  # strict 0; compatible 1 (substring)
    ], {"strict": {"accuracy": 50.0}, "tinygptv-compatible": {"accuracy": 75.0}}),
    "vsr": ([
        {"id": "0", "answer": "True"},             # label true: strict 1, compatible 1
        {"id": "1", "answer": "no, it is false"},  # label false: strict 0, compatible 1; main copy counts 2
        {"id": "2", "answer": "yes"},              # label true: strict 0, compatible 0; yes/no reading 1
    ], {"strict": {"accuracy": 100 / 3},
        "tinygptv-compatible": {"accuracy": 200 / 3, "yes_no_counted_once": 100.0,
                                "main_copy_double_count": 400 / 3}}),
    "iconqa": ([
        {"id": "p1", "answer": "4", "choice": 1},  # correct
        {"id": "p2", "answer": "square"},          # wrong; no "choice": the index is found from the text
        {"id": "p3", "answer": "1", "choice": 1},  # wrong ("10" is right) but "1" is inside "10": compatible 1
    ], {"strict": {"accuracy": 100 / 3}, "tinygptv-compatible": {"accuracy": 200 / 3}}),
    "vizwiz": ([
        # 6 x unanswerable: strict 1 (each leave-one-out subset holds >= 5); compatible 1 (6 contained)
        {"id": "VizWiz_val_00000000.jpg", "answer": "Unanswerable."},
        # answers 2, 2, two, 3 x 7: strict: three "2" after normalisation -> (3 * 2/3 + 7 * 1) / 10 = 0.9;
        # compatible: only "two" equals "two" -> 1/3
        {"id": "VizWiz_val_00000001.jpg", "answer": "two"},
        # empty answer: strict 0; compatible 1 ("" is contained in every "yes")
        {"id": "VizWiz_val_00000002.jpg", "answer": ""},
    ], {"strict": {"accuracy": 100 * 1.9 / 3}, "tinygptv-compatible": {"accuracy": 100 * (7 / 3) / 3}}),
    "hm": ([
        {"id": "1", "answer": "Yes.", "p_yes": 0.9},           # label 1: strict right, compatible right
        {"id": "2", "answer": "I do not know", "p_yes": 0.2},  # label 0: strict wrong; compatible "no" -> right
        {"id": "3", "answer": "yes", "p_yes": 0.6},            # label 0: wrong, wrong
        {"id": "4", "answer": "no", "p_yes": 0.6},             # label 1: wrong, wrong
        # AUROC: positive scores {0.9, 0.6}, negative {0.2, 0.6}: pairs 1 + 1 + 1 + 0.5 (tie) = 3.5 of 4
        # p_yes > 0.5 is right for ids 1, 2, 4 -> 75 %
    ], {"strict": {"accuracy": 25.0, "auroc": 87.5, "likelihood_accuracy": 75.0},
        "tinygptv-compatible": {"accuracy": 50.0}}),
    "okvqa": ([
        {"id": "420", "answer": "cat"},      # answers 10 x dog: 0 and 0
        {"id": "421", "answer": "2"},        # answers 10 x "two": strict normalises them to "2" -> 1; the official
                                             # tool leaves unanimous answers untouched -> 0
        {"id": "70", "answer": "T-shirt"},   # 4 x t-shirt, 6 x shirt: both sides "t shirt" -> 1 and 1
    ], {"strict": {"accuracy": 200 / 3}, "tinygptv-compatible": {"accuracy": 100 / 3}}),
    "refcoco": ([
        {"id": "val/0/100", "answer": "{<0><0><50><50>}"},                    # IoU 1: hit, hit
        {"id": "val/0/101", "answer": "the dog is at { <0> <0> <50> <50> }"},  # box not at the start: hit, miss
        # gt [50, 50, 100, 100], pred [50, 50, 75, 100]: IoU exactly 0.5 -> strict miss (> 0.5 needed); the
        # official +1 areas give 26*51 / (51*51) = 0.51 -> compatible hit
        {"id": "testA/1/102", "answer": "{<50><50><75><100>}"},
        {"id": "testB/2/103", "answer": "no box here"},                      # miss, miss
    ], {"strict": {"accuracy": 50.0, "val": 100.0, "testA": 0.0, "testB": 0.0},
        "tinygptv-compatible": {"accuracy": 50.0, "val": 50.0, "testA": 100.0, "testB": 0.0}}),
}
