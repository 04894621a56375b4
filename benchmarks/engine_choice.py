# Which engine runs TinyGPT-V's LLM fastest on this machine, measured in one run on the same weights: our PyTorch int4
# layers, OpenVINO int4 (nncf, symmetric, groups of 128) under several runtime settings, and ONNX Runtime's
# MatMulNBits int4 (block 128). The choice behind --backend openvino; docs/quantization.md quotes its output.
"""Full-width Phi-2 blocks (TinyGPT-V's, extra norms included) with --layers decoder layers (default 8, so the fp32
model to export fits beside the others on a shared 24 GB machine; a whole model has 32) and the whole 51,200-token
lm_head, random weights. Each engine runs the same graph, tinygptv.engine.step.LLMStep: a prefill of --prompt
embeddings (logits for the last position only) and --new single-token decode steps with its K/V cache, batch 1.

    pip install 'tinygptv[openvino]' onnxruntime onnx onnx-ir   # ONNX Runtime is measured here only
    python benchmarks/engine_choice.py --layers 8 --threads 2 --out runs/engine_choice.json
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from tinygptv.config import LLMConfig, TinyGPTVConfig
from tinygptv.engine.attach import random_part
from tinygptv.engine.openvino_export import LLM_XML, export_llm
from tinygptv.engine.openvino_compile import compile_file
from tinygptv.engine.openvino_llm import EngineState
from tinygptv.engine.step import INPUT_NAMES, LLMStep, example_inputs, kv_names, kv_shape
from tinygptv.quant.cpu_linear import Int4Linear

# OpenVINO CPU settings tried for int4: its defaults on a bf16 CPU (bf16 activations, u8 K/V, activations quantized
# in groups of 32 for the int4 matmuls) and each of them switched back to fp32.
OPENVINO_SETTINGS = {
    "defaults (bf16, u8 K/V, dyn-quant 32)": {"INFERENCE_PRECISION_HINT": "bf16", "KV_CACHE_PRECISION": "u8",
                                              "DYNAMIC_QUANTIZATION_GROUP_SIZE": "32"},
    "f32, f32 K/V, no dyn-quant": {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32",
                                   "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"},
    "f32, f32 K/V, dyn-quant 32": {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32",
                                   "DYNAMIC_QUANTIZATION_GROUP_SIZE": "32"},
    "bf16, f32 K/V, no dyn-quant": {"INFERENCE_PRECISION_HINT": "bf16", "KV_CACHE_PRECISION": "f32",
                                    "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"},
}


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def summary(prefill_runs, decode_runs, prompt: int, new: int) -> dict:
    return {"prefill_tok_s": prompt / statistics.median(prefill_runs),
            "decode_tok_s": new / statistics.median(decode_runs),
            "prefill_runs_s": prefill_runs, "decode_runs_s": decode_runs}


def measure_torch_int4(llm: nn.Module, embeds, steps, repeats: int) -> dict:
    """Our --quant int4 layers (PyTorch's int4 CPU kernel, bf16 activations), driven through a DynamicCache."""
    for name, module in [(n, m) for n, m in llm.named_modules() if type(m) is nn.Linear]:
        parent, _, leaf = name.rpartition(".")
        setattr(llm.get_submodule(parent), leaf, Int4Linear.from_linear(module.to(torch.bfloat16)))
    llm.to(torch.bfloat16)
    prompt = embeds.to(torch.bfloat16)

    def prefill():
        cache = DynamicCache(config=llm.config)
        llm(inputs_embeds=prompt, cache=cache, use_cache=True, logits_to_keep=1)
        return cache

    def decode():
        cache = prefill()  # not in the timing of the steps below
        start = time.perf_counter()
        for e in steps:
            llm(inputs_embeds=e.to(torch.bfloat16), cache=cache, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - start

    with torch.inference_mode():
        prefill_runs = timed(prefill, repeats)
        decode()
        decode_runs = [decode() for _ in range(repeats)]
    return summary(prefill_runs, decode_runs, prompt.shape[1], len(steps))


def measure_openvino(folder: Path, llm_config, settings: dict, threads: int, embeds, steps, repeats: int) -> dict:
    compiled = compile_file(folder, LLM_XML, "int4", threads, overrides=settings)
    heads, head_dim = kv_shape(llm_config)
    prompt_len = embeds.shape[1]
    last = torch.tensor([prompt_len - 1])

    def prefill():
        state = EngineState(compiled, 1, heads, head_dim)
        state.step(embeds, torch.ones(1, prompt_len, dtype=torch.long), torch.arange(prompt_len)[None], last)
        return state

    def decode():
        state = prefill()  # the K/V lives in the engine: a new prompt each run (not in the timing of steps below)
        start = time.perf_counter()
        for i, e in enumerate(steps):
            total = prompt_len + i + 1
            state.step(e, torch.ones(1, total, dtype=torch.long), torch.tensor([[total - 1]]), torch.tensor([0]))
        return time.perf_counter() - start

    prefill_runs = timed(prefill, repeats)
    decode()
    decode_runs = [decode() for _ in range(repeats)]
    return summary(prefill_runs, decode_runs, prompt_len, len(steps))


def export_onnx(llm: nn.Module, path: Path) -> None:
    n = llm.config.num_hidden_layers
    dynamic = {"inputs_embeds": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "t"}, "position_ids": {0: "b", 1: "s"},
               "logits_index": {0: "k"}, "logits": {0: "b", 1: "k"}}
    dynamic.update({name: {0: "b", 2: "p"} for name in kv_names("past", n)})
    dynamic.update({name: {0: "b", 2: "t"} for name in kv_names("present", n)})
    with torch.no_grad():
        torch.onnx.export(LLMStep(llm).eval(), example_inputs(llm), str(path), dynamo=False, opset_version=17,
                          input_names=[*INPUT_NAMES, *kv_names("past", n)],
                          output_names=["logits", *kv_names("present", n)], dynamic_axes=dynamic)


def quantize_onnx(source: Path, target: Path, accuracy_level: int) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), block_size=128, is_symmetric=True,
                                     accuracy_level=accuracy_level)
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=True)


def measure_onnxruntime(path: Path, llm_config, threads: int, embeds, steps, repeats: int) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    n = llm_config.num_hidden_layers
    heads, head_dim = kv_shape(llm_config)
    prompt_len = embeds.shape[1]
    past_names = kv_names("past", n)

    def run(e, past, total, index):
        feed = {"inputs_embeds": e.numpy(), "attention_mask": np.ones((1, total), np.int64),
                "position_ids": np.arange(total - e.shape[1], total, dtype=np.int64)[None],
                "logits_index": np.array([index], np.int64), **dict(zip(past_names, past))}
        return session.run(None, feed)[1:]

    empty = [np.zeros((1, heads, 0, head_dim), np.float32)] * (2 * n)

    def prefill():
        return run(embeds, empty, prompt_len, prompt_len - 1)

    def decode():
        past = prefill()
        start = time.perf_counter()
        for i, e in enumerate(steps):
            past = run(e, past, prompt_len + i + 1, 0)
        return time.perf_counter() - start

    prefill_runs = timed(prefill, repeats)
    decode()
    decode_runs = [decode() for _ in range(repeats)]
    return summary(prefill_runs, decode_runs, prompt_len, len(steps))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=129, help="prefill length (1 BOS + 32 image + 96 text in TinyGPT-V)")
    p.add_argument("--new", type=int, default=20, help="decode steps")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-onnxruntime", action="store_true")
    p.add_argument("--out", type=Path, default=Path("runs/engine_choice.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    config = LLMConfig(num_layers=args.layers)  # Phi-2's widths, TinyGPT-V's norms
    embeds = torch.randn(1, args.prompt, config.hidden_size, generator=generator) * 0.02
    steps = [torch.randn(1, 1, config.hidden_size, generator=generator) * 0.02 for _ in range(args.new)]
    results = {"machine": platform.processor() or platform.machine(), "threads": args.threads, "layers": args.layers,
               "prompt": args.prompt, "new": args.new, "repeats": args.repeats, "rows": {}}
    scratch = Path(tempfile.mkdtemp(prefix="engine-choice-"))

    def record(name, row):
        results["rows"][name] = row
        print(f"{name:50s} prefill {row['prefill_tok_s']:7.1f} tok/s   decode {row['decode_tok_s']:6.2f} tok/s",
              flush=True)

    # ONNX is exported from fp32 weights; without it, bf16 weights halve the memory (a whole model fits: --layers 32)
    llm = random_part(TinyGPTVConfig(llm=config), "llm", torch.float32 if not args.no_onnxruntime else torch.bfloat16)
    llm_config = llm.config
    print(f"exporting {args.layers} full-width layers ...", flush=True)
    if not args.no_onnxruntime:
        export_onnx(llm, scratch / "llm.onnx")
        for level in (0, 4):  # 0: fp32 activations; 4: int8 activations inside the int4 matmuls
            quantize_onnx(scratch / "llm.onnx", scratch / f"llm-int4-a{level}.onnx", level)
    (scratch / "openvino").mkdir()
    export_llm(llm, "int4", scratch / "openvino")
    record("pytorch int4 (Int4Linear, bf16 activations)", measure_torch_int4(llm, embeds, steps, args.repeats))
    del llm
    gc.collect()
    for name, settings in OPENVINO_SETTINGS.items():
        record(f"openvino int4 {name}",
               measure_openvino(scratch / "openvino", llm_config, settings, args.threads, embeds, steps, args.repeats))
    if not args.no_onnxruntime:
        for level in (0, 4):
            record(f"onnxruntime int4 MatMulNBits accuracy_level {level}",
                   measure_onnxruntime(scratch / f"llm-int4-a{level}.onnx", llm_config, args.threads, embeds, steps,
                                       args.repeats))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
