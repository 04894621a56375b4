# Helpers on a model's tensors that every loader and builder shares: casting without touching computed tables,
# rebuilding non-persistent buffers after a meta-device build, LoRA's two names for a wrapped weight, and the one set
# of rules for weights that start fresh (no file provides them). Sits beside the modules; knows no files.
from __future__ import annotations

import zlib
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

FRESH_STD = 0.02  # BERT's initializer_range, which BLIP-2 uses for the Q-Former parts BERT does not provide


def cast_weights(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """module.to(dtype) for weights and saved buffers only: computed tables (rotary inverse frequencies) stay fp32, as
    a model built in that dtype has them; casting them too would round the rotary angles to bf16."""
    kept = [(m, n, b) for m in module.modules() for n, b in m.named_buffers(recurse=False)
            if n in m._non_persistent_buffers_set and b is not None]
    module.to(dtype)
    for m, n, b in kept:
        setattr(m, n, b)
    return module


def materialize_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (the rotary inverse frequencies) are in no file; after a meta-device build they are
    recomputed by building that small module again on the CPU from its config."""
    for module in model.modules():
        meta = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if not meta:
            continue
        if not hasattr(module, "config"):
            raise RuntimeError(f"cannot rebuild buffers {meta} of {type(module).__name__}: it has no config")
        with torch.device("cpu"):
            fresh = type(module)(module.config)
        for n in meta:
            setattr(module, n, getattr(fresh, n))


def without_lora(key: str) -> str:
    """peft renames a wrapped Linear's weight X.weight -> X.base_layer.weight; this is the name without LoRA."""
    return key.replace(".base_layer.", ".")


def align_lora_names(state: Mapping[str, Tensor], expected: Iterable[str]) -> dict[str, Tensor]:
    """Map each key to the form `expected` uses (with or without `.base_layer.`), so weights saved without LoRA load
    into a model with LoRA and back."""
    expected = set(expected)
    out = {}
    for key, value in state.items():
        if key not in expected:
            if ".base_layer." in key and without_lora(key) in expected:
                key = without_lora(key)
            else:
                head, _, leaf = key.rpartition(".")
                if f"{head}.base_layer.{leaf}" in expected:
                    key = f"{head}.base_layer.{leaf}"
        out[key] = value
    return out


# --- weights that start fresh ----------------------------------------------------------------------------------------

Noise = Callable[[str, tuple[int, ...], torch.dtype], Tensor]  # (name, shape, dtype) -> N(0, FRESH_STD) values


class FreshInitError(ValueError):
    pass


def seeded_noise(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """N(0, 0.02) from a generator seeded with the weight's name: the value depends only on that name and torch's CPU
    generator, not on the machine, the build order or the transformers version."""
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.empty(shape, dtype=dtype).normal_(0.0, FRESH_STD, generator=generator)


class RepeatedNoise:
    """Noise for weights that only need to exist (speed measurements): one block of N(0, 0.02) repeated through each
    tensor. Drawing 3.9 B fresh normals takes minutes on one core; kernels run at the same speed on any values."""

    def __init__(self, block: int = 1 << 22, seed: int = 0):
        self.noise = torch.randn(block, generator=torch.Generator().manual_seed(seed)).mul_(FRESH_STD)
        self.by_dtype: dict[torch.dtype, Tensor] = {}

    def __call__(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        if dtype not in self.by_dtype:  # converted once per dtype, not once per tensor
            self.by_dtype[dtype] = self.noise.to(dtype)
        noise = self.by_dtype[dtype]
        out = torch.empty(shape, dtype=dtype)
        flat = out.view(-1)
        for start in range(0, flat.numel(), noise.numel()):
            end = min(start + noise.numel(), flat.numel())
            flat[start:end].copy_(noise[:end - start])
        return out


def _is_norm(module: nn.Module) -> bool:
    return "Norm" in type(module).__name__  # LayerNorm, LlamaRMSNorm, BatchNorm2d


def fresh_tensor(key: str, module: nn.Module, leaf: str, shape: tuple[int, ...], dtype: torch.dtype, noise: Noise,
                 *, strict: bool = False) -> Tensor:
    """The start value of tensor `leaf` of `module` (full name `key`) when no file provides it. Norms start as the
    identity (weight 1, bias 0), every bias at 0, BatchNorm statistics as a unit Gaussian (running mean 0, var 1,
    no batches seen), any other weight as noise(key, shape, dtype). With `strict`, noise is allowed only for Linear
    weights and Q-Former query tokens (the parts TinyGPT-V adds to pretrained backbones): another tensor without a
    source is an error, not silent noise."""
    if leaf.endswith("bias") or leaf in ("running_mean", "num_batches_tracked"):
        return torch.zeros(shape, dtype=dtype)
    if (_is_norm(module) and leaf == "weight") or leaf == "running_var":
        return torch.ones(shape, dtype=dtype)
    if strict and not ((isinstance(module, nn.Linear) and leaf == "weight") or leaf == "query_tokens"):
        raise FreshInitError(f"{key}: no file provides it and a {type(module).__name__}.{leaf} has no fresh-start "
                             "rule")
    return noise(key, shape, dtype)


def materialize_fresh(module: nn.Module, prefix: str, dtype: torch.dtype, noise: Noise) -> None:
    """Give every meta-device tensor of `module` itself (not its children) its fresh value, in `dtype` for floating
    point tensors; frozen (requires_grad False), as weights built for inference are."""
    for leaf, p in list(module.named_parameters(recurse=False)):
        if p.is_meta:
            value = fresh_tensor(f"{prefix}{leaf}", module, leaf, tuple(p.shape), dtype, noise)
            setattr(module, leaf, nn.Parameter(value, requires_grad=False))
    persistent = {n for n, _ in module.named_buffers(recurse=False)} - module._non_persistent_buffers_set
    for leaf in persistent:
        b = getattr(module, leaf)
        if b is not None and b.is_meta:
            kind = dtype if b.is_floating_point() else b.dtype
            module.register_buffer(leaf, fresh_tensor(f"{prefix}{leaf}", module, leaf, tuple(b.shape), kind, noise))
