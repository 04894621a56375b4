# What a bench worker measures on a TinyGPT-V model: load it at one precision (and backend), then time the data path
# as `ask` runs it (encode_image -> build_inputs -> LLM prefill -> greedy decode), each part alone and end to end.
from __future__ import annotations

import inspect
import time

import torch

from tinygptv.bench.cost import encode_flops
from tinygptv.bench.generation import fixed_length_kwargs, time_answers, time_first_answer
from tinygptv.bench.timing import median, memory_report, peak_rss_bytes, sync, time_runs
from tinygptv.checkpoint.loading import engine_target, load_model, model_config
from tinygptv.checkpoint.release import PRESET_PREFIX, requested_preset
from tinygptv.config import PRESETS, TinyGPTVConfig, preset
from tinygptv.data.image_processor import ImageProcessor
from tinygptv.data.templates import IMAGE_PLACEHOLDER
from tinygptv.engine.backends import TORCH
from tinygptv.quant.apply import weight_bytes_per_token

# one definition for every row, the reference too (an engine adds the size of its weights file)
WEIGHT_BYTES_SOURCE = "tinygptv.quant.apply.weight_bytes_per_token"
ENGINE_WEIGHT_BYTES_SOURCE = WEIGHT_BYTES_SOURCE + " + the engine's weights file"

# Text that a tokenizer splits into one token per repeat (BPE vocabularies: " the"; the byte-level one: "a"); the
# first unit that gives exactly --prompt-tokens tokens is used.
FILLER_UNITS = (" the", " a", "a", " x")
PREFILL_METHOD = "model.build_inputs + one model.llm forward (use_cache=True, logits only for the last position)"


def bench_config(spec: dict) -> TinyGPTVConfig:
    """The config of the benched model, with --image-size applied. Only a preset can change size: a checkpoint's
    position embedding was trained for its own size (stage 4's preset is the 448-px model)."""
    name = spec["model"]
    preset_name = requested_preset(name)
    if preset_name is not None:
        config = preset(preset_name)
    else:
        config = model_config(name)
    size = spec.get("image_size")
    if size and size != config.vision.image_size:
        if preset_name is None:
            raise ValueError(f"--image-size {size}: {name} is a checkpoint built for {config.vision.image_size} px; "
                             "--image-size changes presets only")
        config.vision.image_size = size
    return config


def model_name(spec: dict) -> str:
    """The name to hand load_model. A preset at another image size is registered under a derived name in this worker
    process only, so load_model builds it through its own (quantizing) path."""
    name, size = spec["model"], spec.get("image_size")
    preset_name = requested_preset(name)
    if preset_name is None or not size or size == preset(preset_name).vision.image_size:
        return name
    derived = f"{preset_name}@{size}px"
    if derived not in PRESETS:
        PRESETS.register(derived, lambda: bench_config(spec))
    return PRESET_PREFIX + derived


def load(spec: dict):
    return load_model(model_name(spec), quant=spec["quant"], quiet=True, device=spec["device"],
                      backend=spec.get("backend", TORCH))


def first_load(spec: dict, log) -> dict:
    """An engine mode's first load, alone in its process: the conversion when none is cached (then its time and peak
    memory are the conversion's), so the measured job that follows loads as every later run does."""
    _, _, folder = engine_target(model_name(spec), spec["backend"], spec["quant"])
    converted = not folder.complete()
    log(f"first load of {spec['model']} on {spec['backend']} ({spec['quant']}): "
        f"{'converting' if converted else 'already converted'} ({folder.path})")
    start = time.perf_counter()
    load(spec)
    return {"converted": converted, "load_s": time.perf_counter() - start, "peak_rss_bytes": peak_rss_bytes(),
            "engine_folder": str(folder.path)}


def llm_weight_bytes(llm) -> int:
    """Bytes of weights one decoded token reads: the PyTorch modules (for an engine's LLM, the embedding row) plus
    what the engine holds (its weights file: compressed weights, their scales, norms)."""
    return weight_bytes_per_token(llm) + getattr(llm, "engine_weight_bytes", 0)


def image_pixels(config: TinyGPTVConfig, spec: dict) -> torch.Tensor:
    """A real image through the model's processor when --image is given, else random pixels: the encoder's speed
    does not depend on what the picture shows."""
    if spec.get("image"):
        return ImageProcessor(config.vision)([spec["image"]])  # [1, 3, S, S]
    size = config.vision.image_size
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))  # [1, 3, S, S]


def filler_text(tokenize, n: int) -> str:
    for unit in FILLER_UNITS:
        if len(tokenize(unit * n)) == n:
            return unit * n
    raise ValueError(f"cannot build a prompt of exactly {n} tokens with this tokenizer (tried {FILLER_UNITS})")


def prefill_length(config: TinyGPTVConfig, prompt_tokens: int) -> int:
    """Tokens the LLM sees at prefill: BOS (when the model adds one at inference) + the image embeddings + the text."""
    return int(config.prompt.bos_at_inference) + config.qformer.num_query_tokens + prompt_tokens


def logits_to_keep(llm) -> dict:
    """Ask for the last position's logits only, as generate() does: a full [L, V] projection is not prefill work."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(llm.forward).parameters else {}


def first_float_dtype(module: torch.nn.Module) -> str:
    for p in module.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return "unknown"


def common_row(spec: dict, config: TinyGPTVConfig, tower, flops: int | None, load_s: float, rss_after_load: int,
               **fields) -> dict:
    """The fields every row has, from the model, the reference alike, plus the row's own `fields`."""
    return {"model": spec["model"], "load_s": load_s, "peak_rss_after_load_bytes": rss_after_load,
            "llm": config.llm.name, "vision_tower": config.vision.name, "image_size": config.vision.image_size,
            "vision_tokens": tower.num_tokens, "image_embeddings": config.qformer.num_query_tokens,
            "encode_gflop": None if flops is None else flops / 1e9, **fields}


def time_encode(encode, flops: int | None, spec: dict, device: torch.device) -> dict:
    """Median time of one image through `encode` and, for towers with a FLOP count, its GFLOP/s."""
    runs = time_runs(encode, warmup=spec["warmup"], repeats=spec["repeats"], device=device)
    return {"encode_s": median(runs), "encode_runs_s": runs,
            "encode_gflop_s": None if flops is None else flops / 1e9 / median(runs)}


def measure_tinygptv(spec: dict, log) -> dict:
    device = torch.device(spec["device"])
    warmup, repeats, new_tokens = spec["warmup"], spec["repeats"], spec["new_tokens"]

    log(f"loading {spec['model']} with quant={spec['quant']}")
    start = time.perf_counter()
    model = load(spec)
    sync(device)
    load_s = time.perf_counter() - start
    rss_after_load = peak_rss_bytes()
    log(f"loaded in {load_s:.1f} s (peak RSS so far {rss_after_load / 1e9:.2f} GB)")
    config = model.config
    tower = model.visual_encoder
    pixels = image_pixels(config, spec).to(device)
    flops = encode_flops(config, tower.num_tokens, tower.num_features)
    backend = spec.get("backend", TORCH)
    row = common_row(spec, config, tower, flops, load_s, rss_after_load, quant=spec["quant"], backend=backend,
                     llm_dtype=str(model.llm_dtype).removeprefix("torch."),
                     vision_dtype=getattr(tower, "engine_precision", None) or first_float_dtype(tower),
                     lora_r=config.lora.r)
    prompt = IMAGE_PLACEHOLDER + filler_text(model.tokenize, spec["prompt_tokens"])
    add_bos = config.prompt.bos_at_inference

    def build():
        return model.build_inputs([prompt], model.encode_image(pixels), add_bos=add_bos, padding_side="left")

    def answer(n, timer):
        step_inputs = build()  # encode + splice: `ask` does both for its question
        timer.begin()
        out = model.llm.generate(inputs_embeds=step_inputs.inputs_embeds, attention_mask=step_inputs.attention_mask,
                                 **fixed_length_kwargs(config.llm, n), streamer=timer)
        model.tokenizer.batch_decode(out, skip_special_tokens=True)

    with torch.inference_mode():
        log(f"the first answer of {new_tokens} tokens")
        row.update(time_first_answer(answer, new_tokens=new_tokens, device=device))
        log(f"encoding: {warmup} warm-up + {repeats} timed images")
        row.update(time_encode(lambda: model.encode_image(pixels), flops, spec, device))

        inputs = build()
        length = inputs.inputs_embeds.shape[1]
        log(f"prefill of {length} tokens: {warmup} warm-up + {repeats} timed")
        keep = logits_to_keep(model.llm)
        runs = time_runs(lambda: model.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                                           use_cache=True, **keep),
                         warmup=warmup, repeats=repeats, device=device)
        row.update(prompt_text_tokens=spec["prompt_tokens"], prefill_tokens=length, prefill_s=median(runs),
                   prefill_runs_s=runs, prefill_tok_s=length / median(runs), prefill_method=PREFILL_METHOD)

        log(f"answers of {new_tokens} tokens: {warmup} warm-up + {repeats} timed")
        row.update(time_answers(answer, new_tokens=new_tokens, warmup=warmup, repeats=repeats, device=device))
    row["weight_bytes_per_token"] = llm_weight_bytes(model.llm)
    row["weight_bytes_source"] = WEIGHT_BYTES_SOURCE if backend == TORCH else ENGINE_WEIGHT_BYTES_SOURCE
    row.update(memory_report(device))
    return row
