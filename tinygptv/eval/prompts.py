# The instruction each benchmark sends, exactly as the official TinyGPT-V / MiniGPT-v2 evaluation data classes write
# it. Data path: benchmark files -> reader + [this prompt] -> template -> model.generate/score -> predictions -> scorer.
"""Benchmark prompts (spec section 8.2; `minigpt4/datasets/datasets/vqa_datasets.py` and `coco_caption.py`).

The strings are verbatim, typos included ("writting", the stray ". and reply"): a model is scored on the prompt the
paper used, not on a cleaned one. The template (`###Human: <Img><ImageHere></Img> {prompt}###Assistant: ` for the
official checkpoints) is applied around them by the runner, so a model trained here with another template gets the
same instruction text in its own template. easy-VQA is not a paper benchmark; it gets the [vqa] short-answer prompt
the paper uses for GQA, OK-VQA and IconQA.
"""
from __future__ import annotations

SHORT_ANSWER = "[vqa] Based on the image, respond to this question with a short answer: {question}"

PROMPTS: dict[str, str] = {
    "gqa": SHORT_ANSWER,
    "okvqa": SHORT_ANSWER,
    "iconqa": SHORT_ANSWER,
    "easyvqa": SHORT_ANSWER,
    "vsr": "[vqa] Based on the image, is this statement true or false? {caption}",
    "vizwiz": "[vqa] The question is '{question}' Based on the image, answer the question with a single word or "
              "phrase. and reply 'unanswerable' when the provided information is insufficient",
    # no task tag: HM was not a stage-4 task
    "hm": "This is an image writting '{text}'. Is this image hateful? Answer yes or no. Answer:",
    "refcoco": "[refer] give me the location of {sentence}",
}


def prompt_for(benchmark: str, **fields: str) -> str:
    """Fill a benchmark's prompt. `str.format` only substitutes into the template, so braces inside a question are
    kept as they are."""
    return PROMPTS[benchmark].format(**fields)
