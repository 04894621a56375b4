# The shared evaluation loop: batches a benchmark's items through the model (generation, candidate ranking or
# yes/no likelihood), appends each prediction to a JSONL as it finishes, resumes from it, shows progress, and writes
# the summary. Data path: reader -> [prompt + template -> model -> predictions.jsonl] -> scoring.score -> summary.json.
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from tinygptv.atomic import STAGING_SUFFIX, check_output_dir, write_json_atomic
from tinygptv.data.image_processor import ImageProcessor
from tinygptv.data.templates import IMAGE_PLACEHOLDER, TEMPLATES, single_prompt
from tinygptv.eval.base import BENCHMARKS, STRICT, Benchmark, Item
from tinygptv.eval.hm import NO_WORDS, YES_WORDS
from tinygptv.eval.scoring import load_predictions, score_predictions
from tinygptv.model.generation import GenerationSettings, cut_at_stop
from tinygptv.model.tinygptv import IGNORE_INDEX

# Templates of official-style models: the paper's benchmarks were run with the "eval" template on them.
OFFICIAL_TEMPLATES = ("stage3", "stage4", "none")
HASH_TEMPLATES = ("eval", "stage3", "stage3-demo")  # templates whose turns end in "###"
OUTPUT_SUFFIXES = (".predictions.jsonl", ".summary.json", ".run.json")  # what a run writes into --out, per benchmark


def default_template(model) -> str:
    """"eval" (the official benchmark template) for models trained with an official template; a model trained here
    with its own template (e.g. ChatML) is asked in that template."""
    name = model.config.prompt.template
    return "eval" if name in OFFICIAL_TEMPLATES else name


def template_for(benchmark: Benchmark, template: str) -> str:
    """The official script used another template for some benchmarks (IconQA: stage 3's); follow it when the run
    uses the official "eval" template."""
    return benchmark.eval_template if template == "eval" and benchmark.eval_template else template


def config_sha256(model) -> str:
    """sha256 of the model's config.json content as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(model.config.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("tinygptv", "torch", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    out["python"] = platform.python_version()
    return out


def is_eval_output(name: str) -> bool:
    """A file eval writes into --out, or the staging file of an interrupted write of one."""
    return name.endswith(OUTPUT_SUFFIXES) or (name.startswith(".") and name.endswith(STAGING_SUFFIX))


def check_out_dir(out: Path, overwrite: bool = False) -> None:
    """--out must be new, empty, or a folder eval has written into (a rerun resumes there; files beside its outputs
    are left alone). A folder holding only other files (a dataset, photos) is refused, naming them, unless
    `overwrite`: eval never deletes what it did not write, but mixing its outputs into such a folder is rarely meant."""
    out = Path(out)
    if out.is_dir() and any(is_eval_output(entry.name) for entry in out.iterdir()):
        return
    check_output_dir(out, is_eval_output, overwrite=overwrite, what="folder of eval outputs")


def output_paths(out: Path, benchmark: str, split: str | None) -> tuple[Path, Path, Path]:
    stem = benchmark if split is None else f"{benchmark}.{split}"
    return out / f"{stem}.predictions.jsonl", out / f"{stem}.summary.json", out / f"{stem}.run.json"


class EmbeddingCache:
    """Image embeddings by file path, least recently used dropped first. Benchmarks ask several questions per image
    (easy-VQA ~10, GQA ~30), so encoding each image once saves most of the vision tower's time."""

    def __init__(self, model, size: int = 256):
        self.model = model
        self.processor = ImageProcessor(model.config.vision)
        self.size = size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @torch.inference_mode()
    def __call__(self, paths: Sequence[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(p for p in paths if p not in self._cache))
        if missing:
            embeds = self.model.encode_image(self.processor(missing))  # [M, Q, D]
            for path, e in zip(missing, embeds):
                self._cache[path] = e
        for p in paths:
            self._cache.move_to_end(p)
        out = torch.stack([self._cache[p] for p in paths])  # [B, Q, D]
        while len(self._cache) > max(self.size, len(set(paths))):
            self._cache.popitem(last=False)
        return out


def first_token_ids(model, words: Sequence[str]) -> list[int]:
    ids = []
    for w in words:
        tokens = model.tokenize(w)
        if tokens and tokens[0] not in ids:
            ids.append(tokens[0])
    return ids


@torch.inference_mode()
def yes_probability(model, prompts: Sequence[str], embeds: torch.Tensor) -> list[float]:
    """p(yes) / (p(yes) + p(no)) of the first answer token, from one forward pass over the prompts (left-padded
    with the positions generate() uses, so it is the distribution greedy decoding picked its first token from)."""
    yes, no = first_token_ids(model, YES_WORDS), first_token_ids(model, NO_WORDS)
    if set(yes) & set(no):
        raise ValueError("the tokenizer gives 'yes' and 'no' the same first token; cannot compare them")
    inputs = model.build_inputs(prompts, embeds, add_bos=model.config.prompt.bos_at_inference, padding_side="left")
    position_ids = (inputs.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                       position_ids=position_ids, logits_to_keep=1).logits[:, -1]  # [B, V]
    probs = logits.float().softmax(-1)
    p_yes, p_no = probs[:, yes].sum(-1), probs[:, no].sum(-1)
    total = p_yes + p_no
    return torch.where(total > 0, p_yes / total.clamp_min(1e-30), torch.full_like(total, 0.5)).tolist()


@torch.inference_mode()
def candidate_losses(model, prompts: Sequence[str], embeds: torch.Tensor, answers: Sequence[str],
                     suffix: str | None = None) -> list[float]:
    """Mean LM loss of each answer + `suffix` (default: the model's end_sym) after its prompt, one value per row: the
    official multi_select's per-candidate loss, computed per sample so candidates can share a batch. The BOS
    embedding is prepended, as the training forward pass multi_select runs always does."""
    suffix = model.config.prompt.end_sym if suffix is None else suffix
    segments = [[(a + suffix, True)] for a in answers]  # supervised text as given: no second end_sym
    inputs = model.build_inputs(prompts, embeds, segments, add_bos=True, padding_side="right")
    logits = model.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask).logits
    logits, labels = logits[:, :-1].float(), inputs.labels[:, 1:]  # position t predicts token t+1
    mask = labels != IGNORE_INDEX
    token_loss = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")  # [B, L-1]
    per_row = (token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_row.tolist()


@torch.inference_mode()
def generate_shared_prefix(model, prompts: Sequence[str], embeds: torch.Tensor, image_keys: Sequence[str],
                           settings: GenerationSettings) -> list[str] | None:
    """Greedy generation that runs the part of the prompt every question of an image shares (template start, image
    embeddings, the fixed start of the instruction) once per image, then only each question's own tokens.

    Benchmarks ask many questions per image with one fixed instruction, so most of a prompt is the same across a
    batch: "<|im_start|>user\n<Img>" + 32 image embeddings + "</Img> [vqa] Based on the image, respond to this
    question with a short answer:" is ~80 % of an easy-VQA prompt. Its keys/values are computed for each distinct
    image, copied to the rows that use it, and generate() continues from that cache with each row's remaining
    tokens (left-padded: the padding sits between the shared part and the question and is masked; positions come
    from the attention mask, as in plain left-padded generation).

    The model input is token-for-token the one model.generate() builds: the split is made before a space, and a
    batch whose split would tokenize differently (or whose prompts differ before the image) returns None, so the
    caller uses model.generate(). Outputs agree with it up to floating-point summation order. Greedy settings only
    (each row continues one copied cache)."""
    if model.tokenizer is None or len(prompts) < 2 or settings.sampling or settings.num_beams > 1:
        return None
    pieces = [p.split(IMAGE_PLACEHOLDER) for p in prompts]
    if any(len(x) != 2 for x in pieces) or len({x[0] for x in pieces}) != 1:
        return None
    tails = [x[1] for x in pieces]
    common = os.path.commonprefix(tails)
    cut = common.rfind(" ")  # the shared text ends before a space: " word" stays one token for BPE tokenizers
    if cut <= 0:
        return None
    shared, rests = tails[0][:cut], [t[cut:] for t in tails]
    shared_ids = model.tokenize(shared)
    rest_ids = [model.tokenize(r) for r in rests]
    if any(not r or shared_ids + r != model.tokenize(shared + rest) for r, rest in zip(rest_ids, rests)):
        return None

    order = list(dict.fromkeys(image_keys))  # distinct images, first-seen order
    first_row = [list(image_keys).index(k) for k in order]
    prefix_prompt = pieces[0][0] + IMAGE_PLACEHOLDER + shared
    prefix = model.build_inputs([prefix_prompt] * len(order), embeds[first_row],
                                add_bos=model.config.prompt.bos_at_inference, padding_side="left")
    out = model.llm(inputs_embeds=prefix.inputs_embeds, attention_mask=prefix.attention_mask, use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    cache.reorder_cache(torch.tensor([order.index(k) for k in image_keys], device=model.device))

    n, p_len = len(prompts), prefix.inputs_embeds.shape[1]
    longest = max(len(r) for r in rest_ids)
    pad_id = model.config.llm.pad_token_id
    rows = [[pad_id] * (longest - len(r)) + r for r in rest_ids]
    rest_embeds = model.llm.get_input_embeddings()(torch.tensor(rows, device=model.device))  # [B, R, D]
    inputs_embeds = torch.cat([rest_embeds.new_zeros(n, p_len, rest_embeds.shape[-1]), rest_embeds], dim=1)
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rest_ids], device=model.device)
    attention_mask = torch.cat([torch.ones(n, p_len, dtype=mask.dtype, device=mask.device), mask], dim=1)
    end_sym = model.config.prompt.end_sym
    new_tokens = model.llm.generate(  # [B, new]: only new tokens come back with inputs_embeds
        inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
        **settings.generate_kwargs(model.config.llm, model.tokenizer, end_sym))
    texts = model.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [cut_at_stop(t, settings.stops(end_sym)).strip() for t in texts]


class Runner:
    """Runs one benchmark for one model into an output folder. See `run_eval`."""

    def __init__(self, model, benchmark: Benchmark, *, template: str, batch_size: int, max_new_tokens: int,
                 stop: bool = True, share_prefix: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.model = model
        self.benchmark = benchmark
        self.template = template_for(benchmark, template)
        TEMPLATES[self.template]  # unknown name: fail now, naming the known ones
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        end_sym = model.config.prompt.end_sym
        stops = [end_sym] + (["###"] if self.template in HASH_TEMPLATES and "###" not in end_sym else [])
        self.stop_strings = stops if stop else []
        # the official benchmark decoding: greedy, no penalty
        self.settings = GenerationSettings(max_new_tokens=max_new_tokens, stop_strings=self.stop_strings)
        self.images = EmbeddingCache(model)
        self.share_prefix = share_prefix
        # what follows a candidate answer when ranking: the official benchmark config sets no end_sym, so the
        # official run used MiniGPT-v2's default "\n" whatever the model was trained with
        official = template == "eval" and benchmark.eval_answer_suffix is not None
        self.answer_suffix = benchmark.eval_answer_suffix if official else model.config.prompt.end_sym

    def decoding(self) -> dict:
        if self.benchmark.mode == "rank":
            return {"mode": "rank", "loss": "mean token cross-entropy of candidate + answer_suffix", "add_bos": True,
                    "answer_suffix": self.answer_suffix, "batch_size": self.batch_size}
        d = {"mode": self.benchmark.mode, "do_sample": False, "num_beams": 1, "repetition_penalty": 1.0,
             "max_new_tokens": self.max_new_tokens, "stop_strings": self.stop_strings,
             "add_bos": self.model.config.prompt.bos_at_inference, "shared_prefix": self.share_prefix,
             "batch_size": self.batch_size}
        if self.benchmark.mode == "yesno":
            d["p_yes"] = "first answer token: p(yes|Yes) / (p(yes|Yes) + p(no|No))"
        return d

    def prompt(self, item: Item) -> str:
        return single_prompt(self.template, item.instruction)

    def predict(self, batch: Sequence[Item]) -> list[dict]:
        embeds = self.images([it.image for it in batch])
        prompts = [self.prompt(it) for it in batch]
        if self.benchmark.mode == "rank":
            return self._rank(batch, prompts, embeds)
        raws = None
        if self.share_prefix:
            raws = generate_shared_prefix(self.model, prompts, embeds, [it.image for it in batch], self.settings)
        if raws is None:
            raws = self.model.generate(None, prompts, image_embeds=embeds, settings=self.settings)
        records = [{"id": it.id, "prompt": p, "raw": raw, "answer": self.benchmark.parse(raw)}
                   for it, p, raw in zip(batch, prompts, raws)]
        if self.benchmark.mode == "yesno":
            for rec, p_yes in zip(records, yes_probability(self.model, prompts, embeds)):
                rec["p_yes"] = p_yes
        return records

    def _rank(self, batch, prompts, embeds) -> list[dict]:
        pairs = [(i, c) for i, it in enumerate(batch) for c in it.candidates]
        losses: list[float] = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            losses += candidate_losses(self.model, [prompts[i] for i, _ in chunk],
                                       embeds[[i for i, _ in chunk]], [c for _, c in chunk], self.answer_suffix)
        records, k = [], 0
        for i, it in enumerate(batch):
            mine = losses[k:k + len(it.candidates)]
            k += len(it.candidates)
            choice = min(range(len(mine)), key=lambda j: mine[j])  # first of equal losses, as argsort
            records.append({"id": it.id, "prompt": prompts[i], "raw": it.candidates[choice],
                            "answer": it.candidates[choice], "choice": choice, "losses": mine})
        return records


def run_eval(model, benchmark: str | Benchmark, data: Path | None, out: Path, *, model_name: str,
             split: str | None = None, images: Path | None = None, limit: int | None = None, batch_size: int = 16,
             template: str | None = None, max_new_tokens: int | None = None, stop: bool = True,
             share_prefix: bool = True, merge_lora: bool = False, overwrite: bool = False,
             progress: bool = True) -> dict:
    """Evaluate `model` on a benchmark and return the summary (also written to {out}/{name}.summary.json).

    Predictions are appended to {out}/{name}.predictions.jsonl one line per item as each batch finishes; a second run
    into the same folder skips the ids already there (an interrupted run resumes; a --limit run can be extended).
    {name}.run.json records the settings, and a resume with different settings is refused unless `overwrite`.
    merge_lora folds LoRA into the LLM weights first (in place: the caller's model changes; the same function, ~25 %
    faster on a CPU); the summary still records the config hash of the model as given."""
    from tqdm import tqdm

    bench = BENCHMARKS[benchmark] if isinstance(benchmark, str) else benchmark
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be positive, got {limit}")
    loaded = bench.read(Path(data) if data is not None else None, split=split,
                        images=Path(images) if images is not None else None)
    items = loaded.items[:limit] if limit is not None else loaded.items
    model_hash = config_sha256(model)
    merged = bool(merge_lora and model.config.lora.r > 0)
    if merged:
        model.merge_lora()
    runner = Runner(model, bench, template=template or default_template(model), batch_size=batch_size,
                    max_new_tokens=max_new_tokens or bench.max_new_tokens, stop=stop, share_prefix=share_prefix)
    out = Path(out)
    check_out_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    pred_path, summary_path, run_path = output_paths(out, bench.name, split)
    settings = {"benchmark": bench.name, "split": loaded.split, "model": model_name,
                "config_sha256": model_hash, "template": runner.template,
                "decoding": {**runner.decoding(), "lora_merged": merged}}
    settings["decoding"].pop("batch_size", None)
    _check_resume(run_path, pred_path, settings, overwrite)
    write_json_atomic(run_path, settings)

    done = {p["id"]: p for p in load_predictions(pred_path, repair=True)}
    todo = group_by_image([it for it in items if it.id not in done])
    by_id = {it.id: it for it in items}
    strict_sum = sum(bench.score_item(by_id[i], p).strict for i, p in done.items() if i in by_id)
    scored = sum(1 for i in done if i in by_id)

    started = time.perf_counter()
    bar = tqdm(total=len(items), initial=len(items) - len(todo), unit="item", desc=bench.name, disable=not progress,
               dynamic_ncols=True)
    with open(pred_path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            for item, rec in zip(batch, runner.predict(batch)):
                s = bench.score_item(item, rec)
                rec["score"] = {"strict": s.strict, "tinygptv-compatible": s.compatible}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                strict_sum += s.strict
                scored += 1
            f.flush()
            bar.update(len(batch))
            bar.set_postfix({STRICT: f"{100 * strict_sum / max(scored, 1):.1f}"})
    bar.close()
    elapsed = time.perf_counter() - started

    kept = [p for p in load_predictions(pred_path) if p["id"] in by_id]  # a --limit run scores its first items only
    summary = score_predictions(bench, items, kept, files=loaded.files, split=loaded.split, root=loaded.root)
    summary.update({
        "model": model_name,
        "config_sha256": settings["config_sha256"],
        "template": runner.template,
        "prompt_example": runner.prompt(items[0]) if items else None,
        "decoding": {**runner.decoding(), "lora_merged": merged},
        "limit": limit,
        "predictions": str(pred_path),
        "resumed_from": len(items) - len(todo),
        "generated": len(todo),
        "elapsed_s": round(elapsed, 3),
        "items_per_s": round(len(todo) / elapsed, 3) if todo and elapsed > 0 else None,
        "versions": package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    write_json_atomic(summary_path, summary)
    return summary


def group_by_image(items: Sequence[Item]) -> list[Item]:
    """Questions about one image next to each other (images in order of first appearance, questions in file
    order), so a batch shares its images' prompt prefix and encodings. Only the processing order changes."""
    first: dict[str, int] = {}
    for i, it in enumerate(items):
        first.setdefault(it.image, i)
    return sorted(items, key=lambda it: first[it.image])


def _check_resume(run_path: Path, pred_path: Path, settings: dict, overwrite: bool) -> None:
    """Predictions made with other settings must not be mixed into this run."""
    if overwrite:
        for p in (pred_path, run_path):
            p.unlink(missing_ok=True)
        return
    if not pred_path.exists() or not run_path.exists():
        return
    try:
        before = json.loads(run_path.read_text())
    except json.JSONDecodeError:
        before = None
    if before != settings:
        changed = sorted(k for k in settings if not isinstance(before, dict) or before.get(k) != settings[k])
        raise ValueError(f"{pred_path} holds predictions made with other settings ({', '.join(changed) or 'unknown'} "
                         f"differ, see {run_path}); pass --overwrite to start again or choose another --out")
