# Puts an engine into a TinyGPTV: [convert the PyTorch vision tower and LLM into an engine folder, once] -> [load the
# engine's tower and LLM, the LLM's embedding table filled by the caller or from PyTorch's] -> model.visual_encoder and
# model.llm replaced, the rest (ln_vision, Q-Former, projections) in the --quant mode's dtypes. checkpoint.loading uses
# it by model name; `tinygptv quantize --backend` on a loaded model.
from __future__ import annotations

import zlib
from typing import Callable

import torch
from torch import nn

from tinygptv.config import TinyGPTVConfig
from tinygptv.engine.backends import ENGINE_MODES, OPENVINO, check_backend
from tinygptv.engine.openvino_export import export_llm
from tinygptv.engine.openvino_llm import load_openvino_llm
from tinygptv.engine.openvino_vision import export_vision, load_openvino_vision
from tinygptv.engine.store import EngineFolder
from tinygptv.model.llm import build_llm
from tinygptv.model.vision import build_vision_tower
from tinygptv.model.weights import RepeatedNoise, materialize_buffers, materialize_fresh
from tinygptv.quant.apply import COMPONENT_DTYPES, cast_components

# The PyTorch side of an engine model, per --quant mode: what stays around the engine (ln_vision, Q-Former,
# projections, the embedding table) in the dtype PyTorch's mode of the same name gives the LLM's tensors
# (quant.apply.COMPONENT_DTYPES: bf16 for int8 / int4, as the rest; `none` keeps what was loaded).
AROUND_LLM_DTYPE = {mode: COMPONENT_DTYPES.get(mode, {}).get("llm") for mode in ENGINE_MODES[OPENVINO]}
# The precision the engine's parts are read or built in for a conversion: bf16 halves a conversion's memory for the
# compressed modes (the LLM is traced from it, its codes differing from those of fp32 weights only by bf16 rounding;
# the tower is made fp32 first, see export_vision); fp32 stays fp32, the parity reference.
SOURCE_DTYPE = {"none": torch.float32, "int8": torch.bfloat16, "int4": torch.bfloat16}
# The parts of a TinyGPTV an engine runs (attribute names) and what exports each, in the order they are converted:
# the LLM first, so the vision tower's fp32 copy (openvino_vision.export_vision) is made in the memory the LLM's
# conversion freed.
EXPORTERS = {"llm": export_llm, "visual_encoder": export_vision}
ENGINE_PARTS = tuple(EXPORTERS)


def convert(folder: EngineFolder, mode: str, parts: dict[str, Callable[[], nn.Module]]) -> None:
    """Export the vision tower and the LLM (LoRA merged) into `folder` unless a complete conversion is already there.
    parts[name]() gives each when its turn comes, so a part built or read only for the conversion is freed once it is
    exported (their weights are read as fp32 from then on: a part is consumed)."""
    if not folder.complete():
        def fill(staged):
            for name, export in EXPORTERS.items():
                export(parts[name](), mode, staged)

        folder.write(fill)


def engine_parts(folder: EngineFolder, config: TinyGPTVConfig, embed_dtype: torch.dtype | None,
                 threads: int | None = None) -> dict[str, nn.Module]:
    """The engine's tower and LLM of a converted folder, by attribute name; the LLM's embedding table is on the meta
    device until filled."""
    check_backend(folder.backend, folder.mode)
    if folder.backend != OPENVINO:
        raise ValueError(f"no engine runtime for backend {folder.backend!r}")
    with torch.device("meta"):
        transformers_config = build_llm(config.llm).config  # the LM's own config (sizes, K/V heads, token ids)
        tower = build_vision_tower(config.vision)  # its sizes only
    llm = load_openvino_llm(folder.path, transformers_config, folder.mode, embed_dtype or torch.float32, threads)
    vision = load_openvino_vision(folder.path, folder.mode, tower.image_size, tower.num_tokens, tower.num_features,
                                  threads)
    return {"visual_encoder": vision, "llm": llm}


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


def random_part(config: TinyGPTVConfig, name: str, dtype: torch.dtype) -> nn.Module:
    """A preset's vision tower or LLM alone with random weights (ShiftedNoise), materialised one module at a time."""
    with torch.device("meta"):
        part = build_vision_tower(config.vision) if name == "visual_encoder" else build_llm(config.llm)
    fill = ShiftedNoise()
    for sub in [n for n, _ in part.named_modules()]:
        materialize_fresh(part.get_submodule(sub), f"{name}.{sub}." if sub else f"{name}.", dtype, fill)
    materialize_buffers(part)
    return part.eval()


def attach_engine(model, folder: EngineFolder, threads: int | None = None):
    """`model` (a loaded TinyGPTV) with its vision tower and LLM converted into `folder` if needed and replaced by the
    engine's, the embedding table carried over, the rest cast as the mode runs it. In place; returns the model."""
    mode = folder.mode
    model.merge_lora()
    embedding = model.llm.get_input_embeddings().weight.detach()
    convert(folder, mode, {name: (lambda name=name: getattr(model, name)) for name in ENGINE_PARTS})
    dtype = AROUND_LLM_DTYPE[mode] or embedding.dtype
    for name, part in engine_parts(folder, model.config, dtype, threads).items():
        setattr(model, name, part)
    model.llm.get_input_embeddings().weight = nn.Parameter(embedding.to(dtype), requires_grad=False)
    cast_components(model, mode)  # the rest as PyTorch's mode has it
    model.config.quant = mode
    model.freeze_as_official()
    return model
