# Text-only turns for a multimodal recipe, answered by the language model itself before any multimodal training
# (self-distillation). Data path: prompts -> base LLM (greedy) -> LLaVA-style JSON -> `llava_json` reader -> stage 4.
"""`python -m tinygptv.train.self_answers --out runs/nano_text/answers.json`
`python -m tinygptv.train.self_answers --compare tinygptv-nano` (how far a trained model's text chat moved)

Stage 4 of the nano model trains short answers about shapes; with no text-only turns in the mix, the LoRA learned to
answer every question in a word ("What is the capital of France?" -> "France"). TinyGPT-V keeps its LM's language
with a text-only instruction set (unnatural_instruction), which is not available offline. Instead the LM answers a
set of varied prompts once, before it is changed, and stage 4 trains on those answers: the model is asked to keep
doing what it did. Greedy decoding makes the file the same on every run."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from tinygptv.atomic import write_json_atomic
from tinygptv.checkpoint.backbones import build_from_backbones
from tinygptv.checkpoint.loading import load_model
from tinygptv.config import preset
from tinygptv.data.templates import single_prompt

# "France" is left out on purpose: the model card's text-only check asks for its capital.
COUNTRIES = ("Italy", "Spain", "Germany", "Japan", "Canada", "Egypt", "Brazil", "India", "Kenya", "Norway",
             "Mexico", "Peru", "Greece", "Australia", "China", "Portugal")
ANIMALS = ("cat", "dog", "spider", "bird", "horse", "ant", "snake", "fish", "cow", "bee", "whale", "frog")
TOPICS = ("the sun", "rain", "the ocean", "music", "trees", "the moon", "friendship", "winter", "bread", "computers",
          "mountains", "the internet", "sleep", "coffee", "books", "volcanoes")
WORDS = ("gravity", "democracy", "photosynthesis", "a noun", "an island", "a triangle", "electricity", "a planet",
         "a verb", "energy", "a library", "an atom")
TEMPLATES = (
    "What is the capital of {country}?",
    "Which continent is {country} in?",
    "How many legs does a {animal} have?",
    "Tell me one fact about the {animal}.",
    "Write one sentence about {topic}.",
    "Write a short poem about {topic}.",
    "Explain {word} in simple words.",
    "What is {word}?",
)
STANDALONE = (
    "Hello!", "Hi, how are you?", "Who are you?", "What can you do?", "Tell me a joke.", "Thank you!",
    "What is 2 plus 3?", "What is 7 times 8?", "What is 10 minus 4?", "What is 100 divided by 4?",
    "How many days are in a week?", "How many months are in a year?", "What colour is the sky?",
    "What colour is grass?", "Name three colours.", "Name three fruits.", "Name three shapes.",
    "Give me a tip for studying.", "How do I make a cup of tea?", "Why is exercise good for you?",
    "What is the largest ocean?", "What is the boiling point of water?", "Translate 'good morning' into Spanish.",
    "Spell the word 'circle' backwards.", "What is the opposite of hot?", "Suggest a name for a cat.",
)


# Never trained on: `--compare` measures on these how far a trained model's text-only chat moved from the LM's own.
HELD_OUT_PROMPTS = (
    "What is the capital of France?", "How many wheels does a bicycle have?", "Write one sentence about cats.",
    "Explain a rainbow in simple words.", "Name three animals.", "What is 3 plus 4?", "Which continent is Chile in?",
    "Tell me one fact about the lion.", "Write a short poem about the sea.", "What is a square?", "Good morning!",
    "How do I boil an egg?",
)


def chat_prompts() -> list[str]:
    """Every prompt once, in a fixed order."""
    prompts = []
    for template in TEMPLATES:
        field = template[template.index("{") + 1:template.index("}")]
        values = {"country": COUNTRIES, "animal": ANIMALS, "topic": TOPICS, "word": WORDS}[field]
        prompts += [template.format(**{field: v}) for v in values]
    return prompts + list(STANDALONE)


def text_turns(model, prompts) -> list[str]:
    """Each prompt as a text-only user turn in the model's own template."""
    return [single_prompt(model.config.prompt.template, p, with_image=False) for p in prompts]


def self_answers(model, prompts: list[str], *, max_new_tokens: int = 128, batch_size: int = 16) -> list[dict]:
    """LLaVA-style text-only records: each prompt and the model's own greedy answer (cut at end_sym)."""
    records = []
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    for batch in tqdm(batches, desc="self answers", unit="batch"):
        answers = model.generate(None, text_turns(model, batch), max_new_tokens=max_new_tokens)
        for prompt, answer in zip(batch, answers):
            answer = answer.strip()
            if keep_answer(answer, len(model.tokenizer.encode(answer, add_special_tokens=False)), max_new_tokens):
                records.append({"conversations": [{"from": "human", "value": prompt},
                                                  {"from": "gpt", "value": answer}]})
    return records


def keep_answer(answer: str, n_tokens: int, max_new_tokens: int) -> bool:
    """Drop what would teach a fault rather than the LM's manner: silence, an answer cut off by the token limit
    (it would teach stopping mid-sentence) and greedy decoding's loops ("a lark, a lark, a lark")."""
    if not answer or n_tokens >= max_new_tokens - 1:
        return False
    words = answer.lower().split()
    return len(words) < 12 or len(set(words)) / len(words) >= 0.5


def compare(models: dict, prompts=HELD_OUT_PROMPTS, *, max_new_tokens: int = 64) -> list[dict]:
    """For each model (the first is the reference LM): its greedy answers, and the mean per-token negative
    log-likelihood it gives the reference's own answers. A model that kept the LM's manner scores close to the
    reference's NLL; one that learned to answer in a word scores far above it."""
    reference = next(iter(models.values()))
    texts = text_turns(reference, prompts)
    wanted = [a.strip() for a in reference.generate(None, texts, max_new_tokens=max_new_tokens)]
    rows = []
    for name, model in models.items():
        answers = [a.strip() for a in model.generate(None, texts, max_new_tokens=max_new_tokens)]
        end = model.config.prompt.end_sym
        nll = [model(None, [t], [a + end]).loss.item() for t, a in zip(texts, wanted)]
        rows.append({"model": name, "nll": sum(nll) / len(nll),
                     "words": sum(len(a.split()) for a in answers) / len(answers), "answers": answers})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tinygptv.train.self_answers",
        description="Write text-only training turns answered by a model's own LM (greedy), in the llava_json "
                    "format. The default model is the nano preset built from its backbone packages before any "
                    "training, i.e. SmolLM2-135M-Instruct as published.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", type=Path, help="the JSON file to write")
    what.add_argument("--compare", nargs="+", metavar="MODEL",
                      help="instead: answer 12 held-out prompts with the reference LM and each MODEL, and print how "
                           "likely each finds the reference's answers (mean NLL per token; lower = closer)")
    parser.add_argument("--model", default=None,
                        help="a model folder or Hub id instead of the untrained nano backbones (the reference)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    if args.model is None:
        model = build_from_backbones(preset("nano")).eval()
    else:
        model = load_model(args.model)
    if args.compare:
        models = {args.model or "nano backbones, untrained": model}
        models.update({name: load_model(name) for name in args.compare})
        with torch.inference_mode():
            rows = compare(models)
        for row in rows:
            print(f"{row['model']}: NLL of the reference's answers {row['nll']:.3f}/token, "
                  f"answers {row['words']:.1f} words on average")
        for k, prompt in enumerate(HELD_OUT_PROMPTS):
            print(f"\n{prompt}")
            for row in rows:
                print(f"  {row['model']}: {row['answers'][k][:160]!r}")
        return 0
    prompts = chat_prompts()
    with torch.inference_mode():
        records = self_answers(model, prompts, max_new_tokens=args.max_new_tokens)
    write_json_atomic(args.out, records)  # a stopped run leaves no partial file a recipe would read
    print(f"wrote {args.out}: {len(records)} text-only turns (of {len(prompts)} prompts)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
