# The official VQA answer normalisation (GT-Vision-Lab/VQA vqaEval.py) as data tables, and the VQA accuracy built on
# it. Data path: benchmark files -> reader + prompt -> model -> predictions -> [scorer: this normalisation] -> score.
"""VQA answer normalisation and accuracy.

The tables below are the ones of the official VQA evaluation tool (`PythonEvaluationTools/vqaEvaluation/vqaEval.py`,
current master of GT-Vision-Lab/VQA), kept as data so they can be read and compared. Two quirks of the official code
are reproduced on purpose, because they change which strings compare equal:

- the period regex is written `(?!<=\\d)(\\.)(?!\\d)`: the first group is a negative *look-ahead* for the literal
  text "<=d", not the intended look-behind, so the rule is really "drop every period not followed by a digit";
- `periodStrip.sub("", text, re.UNICODE)` passes `re.UNICODE` (= 32) as the *count*, so at most 32 periods go.

Where our `strict` score departs from the official tool it is in applying the same normalisation to both sides
(`normalize_answer` on the prediction and on every ground-truth answer): the official tool normalises the prediction
fully but the ground-truth answers only with `processPunctuation`, and only when they disagree, because the VQA
annotations it was written for are already normalised. `official_vqa_accuracy` keeps that asymmetry.

TinyGPT-V's evaluation script does not import that master, but MiniGPT-4's copy of it, which differs again:
`tinygptv_vqa_accuracy` is that copy, the OK-VQA `tinygptv-compatible` score.
"""
from __future__ import annotations

import re
from typing import Sequence

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}

# number words -> digits (the official `manualMap`; "none" counts as 0)
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES = ("a", "an", "the")

# Removed (or turned into a space, see process_punctuation). The apostrophe is not here: "isn't" keeps it, and the
# contractions table maps "isnt" to "isn't" so both spellings meet.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")

PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: see the module docstring
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PERIOD_STRIP_COUNT = re.UNICODE  # sic: the official call passes the flag as the count (32)


def process_punctuation(text: str) -> str:
    """A punctuation mark next to a space (or any mark at all, once the text holds a digit-comma-digit group such as
    "1,000") is deleted; otherwise it becomes a space, so "black/white" -> "black white" but "yes !" -> "yes ".
    Then periods not followed by a digit are dropped ("dog." -> "dog", "2.5" stays)."""
    out = text
    has_number_comma = COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, _PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """Lower-case, number words to digits, articles dropped, missing apostrophes of contractions restored."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The official processing of a predicted answer: newlines and tabs to spaces, strip, punctuation, then digits,
    articles and contractions. Empty in, empty out."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Strict VQA accuracy: min(#matching human answers / 3, 1), averaged over the len(answers) leave-one-out subsets
    (10 choose 9 for the usual ten answers), with `normalize_answer` on both sides. With ten identical answers a match
    scores 1; with exactly three matching answers it scores 0.9 (7 subsets hold all three, 3 hold two)."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one ground-truth answer")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    return _leave_one_out(pred, gts)


def official_vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """What `VQAEval.evaluate` computes for one question: the prediction fully normalised, the ground-truth answers
    only punctuation-processed and only when they are not all the same string."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one ground-truth answer")
    pred = normalize_answer(prediction)
    gts = list(answers)
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    return _leave_one_out(pred, gts)


def tinygptv_vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """What the copy of VQAEval in MiniGPT-4 / TinyGPT-V (minigpt4/common/vqa_tools) computes for one question: when
    the ten answers agree, neither side is normalised (only newlines, tabs and outer spaces go); otherwise both sides
    are fully normalised (punctuation, digits, articles, contractions); the comparison ignores case. So "Yes." against
    ten "yes" scores 0 (the master tool: 1), and "ten" against 3 "10", 3 "ten", 4 "9" scores 1 (the master: 0.9)."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one ground-truth answer")
    pred = prediction.replace("\n", " ").replace("\t", " ").strip()
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        pred = process_digit_article(process_punctuation(pred))
    return _leave_one_out(pred.lower(), [gt.lower() for gt in gts])


def _leave_one_out(pred: str, gts: list[str]) -> float:
    if len(gts) == 1:
        return float(pred == gts[0])
    total = 0.0
    for i in range(len(gts)):
        matches = sum(1 for j, gt in enumerate(gts) if j != i and gt == pred)
        total += min(1.0, matches / 3)
    return total / len(gts)
