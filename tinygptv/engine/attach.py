# Puts an engine's LLM into a TinyGPTV: [convert the PyTorch LLM into an engine folder, once] -> [load the engine LLM,
# its embedding table filled by the caller or from the PyTorch LLM] -> model.llm replaced, the rest of the model in the
# --quant mode's dtypes. checkpoint.loading uses it by model name; `tinygptv quantize --backend` on a loaded model.
from __future__ import annotations

import zlib

import torch
from torch import nn

from tinygptv.config import LLMConfig
from tinygptv.engine.backends import ENGINE_MODES, OPENVINO, check_backend
from tinygptv.engine.openvino_export import export_llm
from tinygptv.engine.openvino_llm import OpenVINOCausalLM, load_openvino_llm
from tinygptv.engine.store import EngineFolder
from tinygptv.model.llm import build_llm
from tinygptv.model.weights import RepeatedNoise, materialize_buffers, materialize_fresh
from tinygptv.quant.apply import COMPONENT_DTYPES, cast_components

# The PyTorch side of an engine model, per --quant mode: everything around the LLM (vision tower, Q-Former,
# projections, the embedding table) in the dtype PyTorch's mode of the same name gives the LLM's tensors
# (quant.apply.COMPONENT_DTYPES: bf16 for int8 / int4, as the rest; `none` keeps what was loaded).
AROUND_LLM_DTYPE = {mode: COMPONENT_DTYPES.get(mode, {}).get("llm") for mode in ENGINE_MODES[OPENVINO]}
# The precision an LLM is converted from: bf16 halves a conversion's memory for the compressed modes (their codes
# differ from those of fp32 weights only by bf16 rounding); fp32 stays fp32, the parity reference.
SOURCE_DTYPE = {"none": torch.float32, "int8": torch.bfloat16, "int4": torch.bfloat16}


def convert(folder: EngineFolder, llm: nn.Module, mode: str) -> None:
    """Export `llm` (LoRA merged; consumed: its weights are read as fp32 from here on) into `folder` unless a complete
    conversion is already there."""
    if not folder.complete():
        folder.write(lambda staged: export_llm(llm, mode, staged), info={"llm_class": type(llm).__name__})


def engine_llm(folder: EngineFolder, llm_config: LLMConfig, embed_dtype: torch.dtype | None,
               threads: int | None = None) -> OpenVINOCausalLM:
    """The engine LLM of a converted folder; its embedding table is on the meta device until filled."""
    check_backend(folder.backend, folder.mode)
    if folder.backend != OPENVINO:
        raise ValueError(f"no engine runtime for backend {folder.backend!r}")
    with torch.device("meta"):
        transformers_config = build_llm(llm_config).config  # the LM's own config (sizes, K/V heads, token ids)
    return load_openvino_llm(folder.path, transformers_config, folder.mode, embed_dtype or torch.float32, threads)


class ShiftedNoise:
    """RepeatedNoise (one block of N(0, 0.02) repeated, as the quantized presets are built: the same values every
    run, so a cached conversion stays valid), started at an offset hashed from each tensor's name. Every weight then
    differs from the others: OpenVINO stores identical constants once, and a preset whose layers all had the same
    weights would shrink to a twentieth of its size, and read that much per token."""

    def __init__(self):
        self.repeated = RepeatedNoise()

    def __call__(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        flat = self.repeated(key, shape, dtype).view(-1)
        return torch.roll(flat, zlib.crc32(key.encode()) % max(flat.numel(), 1)).view(shape)


def random_llm(llm_config: LLMConfig, dtype: torch.dtype) -> nn.Module:
    """A preset's LLM alone with random weights (ShiftedNoise), materialised one module at a time."""
    with torch.device("meta"):
        llm = build_llm(llm_config)
    fill = ShiftedNoise()
    for name in [n for n, _ in llm.named_modules() if n]:
        materialize_fresh(llm.get_submodule(name), f"llm.{name}.", dtype, fill)
    materialize_buffers(llm)
    return llm.eval()


def attach_engine(model, folder: EngineFolder, threads: int | None = None):
    """`model` (a loaded TinyGPTV) with its LLM converted into `folder` if needed and replaced by the engine's, the
    embedding table carried over, the rest cast as the mode runs it. In place; returns the model."""
    mode = folder.mode
    model.merge_lora()
    torch_llm = model.llm
    embedding = torch_llm.get_input_embeddings().weight.detach()
    convert(folder, torch_llm, mode)
    dtype = AROUND_LLM_DTYPE[mode] or embedding.dtype
    llm = engine_llm(folder, model.config.llm, dtype, threads)
    llm.get_input_embeddings().weight = nn.Parameter(embedding.to(dtype), requires_grad=False)
    model.llm = llm
    del torch_llm
    cast_components(model, mode)  # the rest as PyTorch's mode has it
    model.config.quant = mode
    model.freeze_as_official()
    return model

