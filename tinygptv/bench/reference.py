# The baseline every speed-up is quoted against: what a user gets with stock tools. The LLM is transformers' own
# class (PhiForCausalLM / LlamaForCausalLM) at the model's sizes, eager attention, fp32, random weights, no TinyGPT-V
# norms or LoRA; the image is encoded by the same encode_image in fp32 (transformers ships no EVA ViT-g).
from __future__ import annotations

import copy
import dataclasses
import time

import torch
import transformers
from torch import nn

from tinygptv.bench.cost import encode_flops
from tinygptv.bench.generation import fixed_length_kwargs, time_answers, time_first_answer
from tinygptv.bench.timing import median, memory_report, peak_rss_bytes, sync, time_runs
from tinygptv.bench.workload import (
    WEIGHT_BYTES_SOURCE, bench_config, common_row, image_pixels, logits_to_keep, prefill_length, time_encode,
)
from tinygptv.config import LLMConfig, TinyGPTVConfig
from tinygptv.model.llm.llama import llama_config
from tinygptv.model.llm.phi import phi_config
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.quant.apply import weight_bytes_per_token

# LLM family -> the stock transformers class that runs it.
STOCK_LLMS = {"phi": "PhiForCausalLM", "llama": "LlamaForCausalLM"}


def stock_llm(cfg: LLMConfig) -> nn.Module:
    """The stock class, configured from the same LLMConfig as our model (so the sizes cannot drift apart), with the
    TinyGPT-V Q/K LayerNorm switched off (Phi-2 has none; Llama ignores the field) and eager attention."""
    if cfg.name not in STOCK_LLMS:
        raise ValueError(f"no stock reference for LLM {cfg.name!r}; known: {sorted(STOCK_LLMS)}")
    to_config = {"phi": phi_config, "llama": llama_config}[cfg.name]
    config = to_config(cfg, attn_implementation="eager")
    config.qk_layernorm = False
    return getattr(transformers, STOCK_LLMS[cfg.name])(config).eval()


def encoder_only(config: TinyGPTVConfig):
    """A TinyGPTV whose LLM is shrunk to nothing (no layers, a one-row vocabulary, no LoRA), in fp32: its
    encode_image is exactly the model's, and it costs no LLM memory next to the stock LLM."""
    config = copy.deepcopy(config)
    config.llm = dataclasses.replace(config.llm, num_layers=0, vocab_size=1, bos_token_id=0, eos_token_id=0,
                                     pad_token_id=0, pretrained=None)
    config.lora = dataclasses.replace(config.lora, r=0)
    return TinyGPTV(config).eval()


def measure_reference(spec: dict, log) -> dict:
    device = torch.device(spec["device"])
    warmup, repeats, new_tokens = spec["warmup"], spec["repeats"], spec["new_tokens"]
    config = bench_config(spec)

    log(f"building the stock {STOCK_LLMS.get(config.llm.name, config.llm.name)} (eager, fp32) and the fp32 encoder")
    start = time.perf_counter()
    llm = stock_llm(config.llm).to(device)
    encoder = encoder_only(config).to(device)
    sync(device)
    load_s = time.perf_counter() - start
    rss_after_load = peak_rss_bytes()
    log(f"built in {load_s:.1f} s (peak RSS so far {rss_after_load / 1e9:.2f} GB)")
    tower = encoder.visual_encoder
    pixels = image_pixels(config, spec).to(device)
    flops = encode_flops(config, tower.num_tokens, tower.num_features)
    length = prefill_length(config, spec["prompt_tokens"])  # the same sequence length the TinyGPT-V rows prefill
    ids = torch.randint(0, config.llm.vocab_size, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    row = common_row(spec, config, tower, flops, load_s, rss_after_load, quant="reference",
                     llm_class=STOCK_LLMS[config.llm.name], llm_dtype="float32", attn_implementation="eager",
                     vision_dtype="float32", lora_r=0)

    def answer(n, timer):
        encoder.encode_image(pixels)  # the stock LLM takes token ids; the image is encoded for the time only
        timer.begin()
        llm.generate(input_ids=ids, attention_mask=mask, **fixed_length_kwargs(config.llm, n), streamer=timer)

    with torch.inference_mode():
        log(f"the first answer of {new_tokens} tokens")
        row.update(time_first_answer(answer, new_tokens=new_tokens, device=device))
        log(f"encoding (fp32): {warmup} warm-up + {repeats} timed images")
        row.update(time_encode(lambda: encoder.encode_image(pixels), flops, spec, device))

        log(f"prefill of {length} tokens: {warmup} warm-up + {repeats} timed")
        keep = logits_to_keep(llm)
        runs = time_runs(lambda: llm(input_ids=ids, attention_mask=mask, use_cache=True, **keep),
                         warmup=warmup, repeats=repeats, device=device)
        row.update(prompt_text_tokens=spec["prompt_tokens"], prefill_tokens=length, prefill_s=median(runs),
                   prefill_runs_s=runs, prefill_tok_s=length / median(runs),
                   prefill_method="one stock LLM forward over token ids (use_cache=True, last-position logits)")

        log(f"answers of {new_tokens} tokens: {warmup} warm-up + {repeats} timed")
        row.update(time_answers(answer, new_tokens=new_tokens, warmup=warmup, repeats=repeats, device=device))
    row["weight_bytes_per_token"], row["weight_bytes_source"] = weight_bytes_per_token(llm), WEIGHT_BYTES_SOURCE
    row.update(memory_report(device))
    return row
