# An engine folder's OpenVINO files (llm.xml, vision.xml) compiled for this machine's CPU, with the run settings of the
# --quant mode. Between a converted folder (openvino_export.py, openvino_vision.py) and the modules that run it.
from __future__ import annotations

import os
from pathlib import Path

import torch

from tinygptv.engine.openvino_export import import_openvino

# How the CPU plugin runs each mode. fp32 is the parity reference: fp32 arithmetic and K/V, no activation
# quantization. The compressed modes take OpenVINO's own choices for the CPU it finds (on CPUs with bf16: bf16
# activations, u8 K/V, activations quantized in groups of 32 inside the int4/int8 matmuls), which decoded fastest of
# the settings benchmarks/engine_choice.py tries, at a cost in answers within PyTorch's own int8 (quantize's report on
# TinyGPT-V-nano, docs/quantization.md).
FP32 = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
RUNTIME_CONFIG = {"none": FP32, "int8": {}, "int4": {}}

COMPILED_DIR = "compiled"  # inside an engine folder: OpenVINO's cache of the models compiled for this CPU


def compile_file(folder: Path, xml_name: str, mode: str, threads: int | None = None, overrides: dict | None = None):
    """folder/xml_name compiled for this machine's CPU, `threads` threads (default: torch's count). OpenVINO keeps
    the compiled model in folder/compiled (keyed by the model, the settings, the CPU and its own version) when the
    folder is writable: a later load imports it instead of compiling, 0.15 s instead of 1.3-2 s for full-size int8,
    at the cost of about the model's size on disk."""
    ov = import_openvino()
    config = {**RUNTIME_CONFIG[mode], "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
              "INFERENCE_NUM_THREADS": str(threads or torch.get_num_threads()), **(overrides or {})}
    if os.access(folder, os.W_OK | os.X_OK):
        config["CACHE_DIR"] = str(Path(folder) / COMPILED_DIR)
    return ov.Core().compile_model(str(Path(folder) / xml_name), "CPU", config)
