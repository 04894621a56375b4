# The names of the --quant modes, apart from their kernels, so argument parsers (and `tinygptv --help`) can list them
# without importing torch. Data path: --quant NAME -> tinygptv.quant.apply turns a loaded model into that form.
from __future__ import annotations

BNB_MODES = ("bnb-int8", "bnb-nf4")  # bitsandbytes (CUDA)
CPU_MODES = ("int8", "int4", "int8-dynamic")  # PyTorch's CPU kernels
QUANT_MODES = ("none", "bf16", *CPU_MODES, *BNB_MODES)


def modes_for(device: str) -> tuple[str, ...]:
    """The modes worth running on a device ("cpu", "cuda", "cuda:1"): bitsandbytes on CUDA, PyTorch's own kernels on
    the CPU (bitsandbytes' CPU fallback works but dequantizes every layer at every call)."""
    on_cpu = str(device).split(":")[0] == "cpu"
    return tuple(m for m in QUANT_MODES if m not in (BNB_MODES if on_cpu else CPU_MODES))
