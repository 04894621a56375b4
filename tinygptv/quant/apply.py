# Turns a TinyGPTV into its --quant form: model -> [per-component dtypes + LLM linears swapped for int8/int4 layers]
# -> the same forward/generate API. Also builds a preset's random weights directly in that form (no fp32 copy first).
from __future__ import annotations

import torch
from torch import nn

from tinygptv.config import TinyGPTVConfig
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.model.weights import RepeatedNoise, cast_weights, materialize_buffers, materialize_fresh
from tinygptv.quant.bnb_linear import bnb_from_linear, bnb_weight_bytes, import_bitsandbytes, is_bnb_layer
from tinygptv.quant.cpu_linear import Int4Linear, Int8DynamicLinear, Int8Linear, int4_fits
from tinygptv.quant.modes import BNB_MODES, CPU_MODES, QUANT_MODES
COMPONENTS = ("visual_encoder", "connector", "projector", "llm")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# Per mode, the dtype of each component's unquantized tensors. The vision tower runs in bf16 in every reduced mode
# (one image per answer, compute-bound: bf16 GEMMs run ~2.5x fp32). The weight-only int8/int4 kernels take bf16
# activations (30x slower with fp32), so everything around them is bf16; fbgemm's dynamic int8 takes fp32.
ALL_BF16 = dict(visual_encoder=BF16, connector=BF16, projector=BF16, llm=BF16)
COMPONENT_DTYPES = {
    "bf16": ALL_BF16, "int8": ALL_BF16, "int4": ALL_BF16, "bnb-nf4": ALL_BF16,
    # LLM.int8() computes in fp16 (it casts bf16 inputs at every call); the official 8-bit path runs the LLM in fp16
    "bnb-int8": dict(visual_encoder=BF16, connector=BF16, projector=F16, llm=F16),
    "int8-dynamic": dict(visual_encoder=BF16, connector=F32, projector=F32, llm=F32),
}
QUANTIZED_LINEAR = {"int8": Int8Linear, "int4": Int4Linear, "int8-dynamic": Int8DynamicLinear}
QUANTIZED_TYPES = tuple(QUANTIZED_LINEAR.values())


def quantizable(mode: str, linear: nn.Module) -> bool:
    """A plain Linear the mode's kernel can take (int4: inputs a multiple of 32, outputs of 16; others stay bf16)."""
    return type(linear) is nn.Linear and (mode != "int4" or int4_fits(linear.in_features, linear.out_features))


def check_mode(mode: str, device: torch.device | str = "cpu") -> str:
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANT_MODES)}")
    if mode in CPU_MODES and torch.device(device).type != "cpu":
        raise ValueError(f"--quant {mode} runs PyTorch's CPU kernels; on {device} use "
                         f"{' or '.join(BNB_MODES)} (bitsandbytes), or bf16")
    if mode in BNB_MODES:
        import_bitsandbytes()
    if mode == "int8-dynamic" and torch.backends.quantized.engine not in ("x86", "fbgemm"):
        raise ValueError(f"--quant {mode} needs an x86 CPU build of PyTorch (quantized engine here: "
                         f"{torch.backends.quantized.engine}); use bf16")
    return mode


def quantize_model(model, mode: str, device: torch.device | str | None = None):
    """In place: LoRA merged (same outputs, and a LoRA wrapper cannot be quantized), components cast, every Linear of
    the LLM (lm_head included: it is read at every token) replaced by its quantized layer. bitsandbytes layers are
    made on `device` (default: the model's) one at a time; the caller moves the rest of the model there."""
    device = torch.device(device) if device is not None else model.device
    check_mode(mode, device)
    if mode == "none":
        return model
    if model.config.quant != "none":
        raise ValueError(f"the model is already quantized ({model.config.quant}); load the unquantized one")
    model.merge_lora()
    cast_components(model, mode)
    make = quantized_layer_maker(mode, device)
    if make is not None:
        _swap_linears(model.llm, mode, make)
    model.config.quant = mode
    return model


def quantized_layer_maker(mode: str, device: torch.device):
    """linear -> its quantized layer, or None for modes that only cast."""
    if mode in QUANTIZED_LINEAR:
        return QUANTIZED_LINEAR[mode].from_linear
    if mode in BNB_MODES:
        return lambda linear: bnb_from_linear(linear, mode, device)
    return None


def prepare_for_quantized_weights(model, mode: str) -> None:
    """Before loading a saved quantized copy: same layout as quantize_model, with empty layers to fill."""
    check_mode(mode)
    if mode in BNB_MODES:
        raise ValueError(f"a model saved as {mode} cannot be loaded: bitsandbytes quantizes when the weights reach the "
                         f"device, so load the unquantized model with --quant {mode}")
    cast_components(model, mode)
    if mode in QUANTIZED_LINEAR:
        cls = QUANTIZED_LINEAR[mode]
        _swap_linears(model.llm, mode, lambda lin: cls(lin.in_features, lin.out_features, lin.bias is not None))


def cast_components(model, mode: str) -> None:
    """Each component's unquantized tensors in the mode's dtype (COMPONENT_DTYPES; a mode without an entry keeps
    what was loaded)."""
    for name, dtype in COMPONENT_DTYPES.get(mode, {}).items():
        cast_weights(getattr(model, name), dtype)


def _swap_linears(root: nn.Module, mode: str, make) -> int:
    """Replace layer by layer, holding no list of the old layers, so each is freed as soon as it is replaced."""
    swapped = 0
    parents = [n for n, m in root.named_modules() if any(quantizable(mode, c) for c in m.children())]
    for name in parents:
        parent = root.get_submodule(name)
        for child_name in [n for n, c in parent.named_children() if quantizable(mode, c)]:
            setattr(parent, child_name, make(getattr(parent, child_name)))
            swapped += 1
    return swapped


def build_random_quantized(config, mode: str, tokenizer=None, device: torch.device | str = "cpu",
                           engine: dict[str, nn.Module] | None = None):
    """A preset with random weights, materialised one module at a time in its final dtype and quantized at once, so
    the peak memory of building is the quantized model's size, not the fp32 model's (an 8 GB machine cannot hold
    the 15.6 GB fp32 TinyGPT-V first). LoRA is left out: a merged adapter costs nothing at inference. `engine` (an
    inference engine's parts by attribute name, their tensors on the meta device) take the place of the config's
    before anything is materialised: only their own tensors (the LM's embedding table) are then filled."""
    device = torch.device(device)
    check_mode(mode, device)
    make = quantized_layer_maker(mode, device)
    config = TinyGPTVConfig.from_dict(config.to_dict())
    config.lora.r = 0
    with torch.device("meta"):
        model = TinyGPTV(config, tokenizer)
    for name, part in (engine or {}).items():
        setattr(model, name, part)
    dtypes = COMPONENT_DTYPES.get(mode, dict.fromkeys(COMPONENTS, F32))
    fill = RepeatedNoise()
    # Names, not modules: a list of the modules would keep every replaced full-precision Linear alive to the end.
    for name in [n for n, _ in model.named_modules() if n]:
        module = model.get_submodule(name)
        materialize_fresh(module, f"{name}.", dtypes[name.split(".")[0]], fill)
        if make is not None and name.startswith("llm.") and quantizable(mode, module):
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name), leaf, make(module))
        del module
    materialize_buffers(model)
    model.config.quant = mode
    model.freeze_as_official()
    return model.eval()


def weight_bytes_per_token(llm: nn.Module) -> int:
    """Bytes of weights a language model reads to decode one token: every decoder layer, the final norm and lm_head in
    full, one row of the embedding table (a tied lm_head still reads the whole table). Memory bandwidth / this bounds
    decode. Takes the LLM module, so a TinyGPTV's `model.llm` and the bench's stock reference are counted alike."""
    embedding = llm.get_input_embeddings()
    total = 0
    for module in llm.modules():
        if isinstance(module, QUANTIZED_TYPES):
            total += module.weight_bytes
        elif is_bnb_layer(module):
            total += bnb_weight_bytes(module)
        elif module is embedding:
            total += embedding.weight[0].numel() * embedding.weight.element_size()
        else:
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    return total
