# bitsandbytes layers for --quant bnb-int8 / bnb-nf4 (the official TinyGPT-V's 8-bit path, and QLoRA's 4-bit):
# one nn.Linear of the LLM -> [bitsandbytes Linear8bitLt / Linear4bit, quantized as it moves to its device].
from __future__ import annotations

import torch
from torch import nn

# LLM.int8()'s outlier threshold: input columns above it run in 16-bit (bitsandbytes' and transformers' default for
# load_in_8bit, which the official code uses).
INT8_THRESHOLD = 6.0
NF4_BLOCK = 64  # bitsandbytes' 4-bit block: one fp32 absmax per 64 weights


def import_bitsandbytes():
    """bitsandbytes, with a clear error when it is missing (tinygptv.model.lora quietens its import warning)."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ValueError("--quant bnb-int8 / bnb-nf4 need bitsandbytes: pip install 'tinygptv[gpu]' "
                         "(or pip install bitsandbytes)") from e
    return bitsandbytes


def bnb_from_linear(linear: nn.Linear, mode: str, device: torch.device | str) -> nn.Module:
    """The bitsandbytes layer for `linear`, on `device`. bitsandbytes quantizes when the weights move to the device, so
    only one layer's 16-bit weights are ever there at a time."""
    bnb = import_bitsandbytes()
    weight = linear.weight.detach().to(torch.bfloat16)
    has_bias = linear.bias is not None
    if mode == "bnb-int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=INT8_THRESHOLD)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    elif mode == "bnb-nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                  compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=False)
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", blocksize=NF4_BLOCK,
                                         compress_statistics=False)
    else:
        raise ValueError(f"not a bitsandbytes mode: {mode!r}")
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().to(torch.bfloat16), requires_grad=False)
    return layer.to(device)


def is_bnb_layer(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes.")


def bnb_weight_bytes(module: nn.Module) -> int:
    """Bytes a bitsandbytes layer reads per token: its codes, their scales (per row for int8, per block for nf4) and
    the bias."""
    codes = module.weight.numel() * module.weight.element_size()
    n_weights = module.in_features * module.out_features
    scales = module.out_features * 4 if hasattr(module.weight, "SCB") else n_weights // NF4_BLOCK * 4
    bias = 0 if module.bias is None else module.bias.numel() * module.bias.element_size()
    return codes + scales + bias
