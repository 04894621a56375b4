# The machine's own roofs, measured in the same bench run as the model: memory bandwidth (what bounds decode) and
# GEMM throughput at the ViT's MLP shape (what bounds image encoding), plus the facts that identify the machine.
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from tinygptv.bench.timing import median, time_runs

# EVA ViT-g's MLP at 224 px: 257 tokens of width 1408 through fc1 (6144 outputs). Fixed, whatever model is benched,
# so the roof is a property of the machine and comparable between runs.
GEMM_SHAPE = (257, 1408, 6144)  # (tokens, in features, out features)
# CPU flags that decide which kernels torch can use for fp32 / bf16 / int8.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")


def bandwidth(device: torch.device, gib: float = 1.0, warmup: int = 2, repeats: int = 7) -> dict:
    """Read bandwidth over a buffer far larger than any cache, so every byte comes from memory, as a decode step's
    weights do; GB/s with GB = 10^9 bytes. The roof is the fastest of three read patterns: on some hosts torch.sum
    alone reads slower than a matrix-vector product streams weights (stock fp32 decode measured 124 % of a sum-only
    roof on a 2-vCPU Xeon), and a roof below what decode reaches measures nothing."""
    n = max(4096, int(gib * 2**30) // 4 // 4096 * 4096)
    buf = torch.ones(n, dtype=torch.float32, device=device)  # ones, not empty: every page is touched before timing
    half = buf[: n // 2].view(torch.bfloat16)  # the same bytes read as bf16: n // 2 * 4 bytes
    matrix = buf.view(-1, 4096)  # [rows, 4096] fp32: a weight matrix decode would stream
    x = torch.ones(1, 4096, device=device)
    patterns = {
        "torch.sum fp32": (lambda: buf.sum(), n * 4),
        "torch.sum bf16": (lambda: half.sum(), n // 2 * 4),
        "F.linear x[1,4096] fp32 (GEMV)": (lambda: F.linear(x, matrix), n * 4),
    }
    methods = {}
    with torch.inference_mode():
        for name, (fn, nbytes) in patterns.items():
            times = time_runs(fn, warmup=warmup, repeats=repeats, device=device)
            methods[name] = nbytes / median(times) / 1e9
    best = max(methods, key=methods.get)
    return {"gb_s": methods[best], "buffer_bytes": n * 4, "methods_gb_s": methods,
            "method": f"fastest of {', '.join(methods)} over {gib:g} GiB ({best}), median of {repeats} after "
                      f"{warmup} warm-ups"}


def gemm(dtype: torch.dtype, device: torch.device, warmup: int = 2, repeats: int = 9) -> dict:
    """F.linear throughput at the ViT MLP shape: the best a matrix-bound encoder can hope to reach on this machine."""
    m, k, n = GEMM_SHAPE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(device, dtype)  # [tokens, in]
    w = torch.randn(n, k, generator=gen).to(device, dtype)  # [out, in], the nn.Linear layout
    with torch.inference_mode():
        times = time_runs(lambda: F.linear(x, w), warmup=warmup, repeats=repeats, device=device)
    return {"gflop_s": 2 * m * n * k / median(times) / 1e9, "ms": median(times) * 1e3, "runs_s": times,
            "shape": f"x[{m},{k}] W[{n},{k}]", "method": f"F.linear, median of {repeats} after {warmup} warm-ups"}


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return []
    for line in cpuinfo.read_text(errors="replace").splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [f for f in KERNEL_FLAGS if f in present]
    return []


def describe(device: torch.device) -> dict:
    """What a reader needs to compare two result files: the stack, the threads, the hardware."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        transformers_version = version("transformers")
    except PackageNotFoundError:
        transformers_version = None
    info = {
        "torch": torch.__version__, "transformers": transformers_version, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "cpu": cpu_model(), "cpu_flags": cpu_flags(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def measure_machine(device: torch.device, bandwidth_gib: float, log) -> dict:
    info = describe(device)
    log(f"memory bandwidth (fastest of three reads of {bandwidth_gib:g} GiB)")
    info["bandwidth"] = bandwidth(device, bandwidth_gib)
    info["gemm"] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        log(f"GEMM {name} at x[{GEMM_SHAPE[0]},{GEMM_SHAPE[1]}] W[{GEMM_SHAPE[2]},{GEMM_SHAPE[1]}]")
        info["gemm"][name] = gemm(dtype, device)
    return info
