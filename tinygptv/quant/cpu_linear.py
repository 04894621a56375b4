# Weight-quantized replacements for nn.Linear on the CPU, used by tinygptv.quant.apply for --quant int8 / int4 /
# int8-dynamic: model -> [these layers inside the LLM] -> logits. Each saves its weights in a state dict (int8 codes,
# or the int4 kernel's packed bytes, with their scales), so a quantized copy can be saved and loaded again.
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

INT4_GROUPS = (128, 64, 32)  # weights per scale/zero pair along the input: g128 where the width allows
INT4_INNER_K_TILES = 2
# Weights are quantized a block of rows at a time: no fp32 (or int32 codes) copy of a whole lm_head, 0.5 GB for Phi-2.
# A multiple of 64, the int4 packing's row tile.
ROWS_AT_ONCE = 4096


KERNEL_ALIGNMENT = 64  # bytes: the int8 / int4 CPU kernels read their weights with aligned vector loads


class AlignedBuffersOnLoad:
    """Loading gives a layer's buffers fresh, aligned memory. A tensor read from a safetensors file starts wherever the
    file put it (often 4 bytes past a 64-byte boundary), and torch._weight_int8pack_mm then crashed the process (a
    segmentation fault, for 4 rows of input or more) on a quantized copy that loaded without error."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key, value in list(state_dict.items()):
            if key.startswith(prefix) and isinstance(value, Tensor) and value.data_ptr() % KERNEL_ALIGNMENT:
                state_dict[key] = value.clone()  # a new allocation is aligned
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _bias_bytes(bias: Tensor | None) -> int:
    return 0 if bias is None else bias.numel() * bias.element_size()


def row_blocks(n: int):
    for start in range(0, n, ROWS_AT_ONCE):
        yield slice(start, min(start + ROWS_AT_ONCE, n))


def int8_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 codes [N, K] and one fp32 scale per output channel [N], ROWS_AT_ONCE rows in fp32 at a time."""
    codes = torch.empty(w.shape, dtype=torch.int8)
    scale = torch.empty(w.shape[0])
    for rows in row_blocks(w.shape[0]):
        block = w[rows].to(torch.float32, copy=True)  # a copy: the in-place steps below must not touch w
        scale[rows] = block.abs().amax(dim=1).clamp(min=1e-8) / 127
        codes[rows] = block.div_(scale[rows, None]).round_().clamp_(-127, 127).to(torch.int8)
    return codes, scale


class Int8Linear(AlignedBuffersOnLoad, nn.Module):
    """Weight-only int8 (symmetric, one scale per output channel), bf16 activations: `torch._weight_int8pack_mm`.
    The --quant int8 layer: weight-only, because LLM activations have outlier channels that quantizing them too
    (Int8DynamicLinear) hurts (docs/quantization.md has the measured agreement and KL of both)."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.bfloat16))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.bfloat16) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None)
        codes, scale = int8_per_channel(linear.weight.detach())
        q.weight_int8, q.weight_scale = codes, scale.to(torch.bfloat16)
        if linear.bias is not None:
            q.bias = linear.bias.detach().to(torch.bfloat16).clone()
        return q

    @property
    def weight_bytes(self) -> int:
        """Bytes one call reads: codes, scales and bias."""
        return self.weight_int8.numel() + 2 * self.out_features + _bias_bytes(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous(), self.weight_int8,
                                      self.weight_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel weight-only"


class Int8DynamicLinear(nn.Module):
    """int8 weights with the activations quantized per call too: fbgemm's `quantized::linear_dynamic`, fp32 in and
    out. --quant int8-dynamic: the fastest decode of the CPU modes (it reads the weights closer to the memory
    bandwidth than the weight-only kernel; docs/quantization.md has the numbers), at a real quality cost on models
    with outlier activations."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8DynamicLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None)
        q.weight_int8, q.weight_scale = int8_per_channel(linear.weight.detach())
        if linear.bias is not None:
            q.bias = linear.bias.detach().float().clone()
        q.pack()
        return q

    def pack(self) -> None:
        """Hand the weights to fbgemm and drop the plain copy, so the layer holds one int8 copy, not two. The quantized
        tensor is made from the codes themselves (no fp32 round trip). Quantized tensors warn that they are
        deprecated; fbgemm's dynamic int8 GEMM takes its weights only in that form, so the warning is silenced."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantize_per_channel.*deprecated.*")
            warnings.filterwarnings("ignore", message=".*quantized tensor.*deprecated.*")
            zeros = torch.zeros(self.out_features, dtype=torch.long)
            qweight = torch._make_per_channel_quantized_tensor(self.weight_int8, self.weight_scale.double(), zeros, 0)
            self._packed = torch.ops.quantized.linear_prepack(qweight, self.bias)
        self.weight_int8 = torch.empty(0, dtype=torch.int8)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self._packed is None:  # an empty layer waiting for its weights
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        qweight, _ = torch.ops.quantized.linear_unpack(self._packed)
        destination[prefix + "weight_int8"] = qweight.int_repr()
        destination[prefix + "weight_scale"] = self.weight_scale
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.weight_int8 = torch.zeros(self.out_features, self.in_features, dtype=torch.int8)  # shape to check
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.pack()

    @property
    def weight_bytes(self) -> int:
        """Bytes one call reads: codes, scales and bias (the plain codes are dropped once packed, so from the shape)."""
        return self.out_features * self.in_features + 4 * self.out_features + _bias_bytes(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        # reduce_range=False: full 8-bit activations (VNNI CPUs do not saturate; 7-bit costs accuracy)
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).float(), self._packed, False)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel, dynamic act"


INT4_OUT_MULTIPLE = 16  # the CPU packing takes output widths in tiles of 16


def int4_group(in_features: int) -> int | None:
    return next((g for g in INT4_GROUPS if in_features % g == 0), None)


def int4_fits(in_features: int, out_features: int) -> bool:
    return int4_group(in_features) is not None and out_features % INT4_OUT_MULTIPLE == 0


class Int4Linear(AlignedBuffersOnLoad, nn.Module):
    """4-bit weights, asymmetric, one bf16 scale and zero per group of inputs; bf16 activations through
    `aten._weight_int4pack_mm_for_cpu` (with fp32 activations that kernel is 30x slower, so inputs are cast).

    Only the kernel's packed form is kept, and it is what a saved copy stores (PyTorch's CPU int4 layout, inner k
    tiles 2): keeping a portable copy beside it would double the int4 weights in memory."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int | None = None):
        super().__init__()
        group_size = group_size or int4_group(in_features)
        if group_size is None or in_features % group_size or out_features % INT4_OUT_MULTIPLE:
            raise ValueError(f"int4: a {in_features} -> {out_features} layer does not fit the kernel (inputs a "
                             f"multiple of a group size {INT4_GROUPS}, outputs of {INT4_OUT_MULTIPLE})")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight_int4pack", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros",
                             torch.zeros(in_features // group_size, out_features, 2, dtype=torch.bfloat16))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.bfloat16) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int4Linear":
        n, k = linear.weight.shape
        q = cls(k, n, linear.bias is not None)
        scale = torch.empty(n, k // q.group_size, 1)
        lo = torch.empty_like(scale)
        packed = torch.empty(n, k // 2, dtype=torch.uint8)
        # The CPU packing works on tiles of rows, so packing a block of rows gives those rows of the whole packing
        # (tests check it): the int32 codes the converter takes exist for one block at a time, not for a whole lm_head.
        for rows in row_blocks(n):
            count = rows.stop - rows.start
            groups = linear.weight.detach()[rows].to(torch.float32, copy=True).reshape(count, -1, q.group_size)
            lo[rows] = groups.amin(-1, keepdim=True)
            scale[rows] = (groups.amax(-1, keepdim=True) - lo[rows]).clamp(min=1e-6) / 15
            codes = groups.sub_(lo[rows]).div_(scale[rows]).round_().clamp_(0, 15).reshape(count, k).int()
            packed[rows] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INT4_INNER_K_TILES)
        zero = lo + 8 * scale  # the kernel computes (code - 8) * scale + zero
        q.weight_int4pack = packed
        q.scales_and_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        if linear.bias is not None:
            q.bias = linear.bias.detach().to(torch.bfloat16).clone()
        return q

    @property
    def weight_bytes(self) -> int:
        """Bytes one call reads: packed codes, scales and zeros, and bias."""
        return self.weight_int4pack.numel() + self.scales_and_zeros.numel() * 2 + _bias_bytes(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(  # the kernel takes only contiguous inputs
            x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous(), self.weight_int4pack, self.group_size,
            self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 g{self.group_size}"
