# The names of the --backend choices and the --quant modes each one runs, apart from any engine code, so argument
# parsers (and `tinygptv --help`) list them without importing torch. --backend NAME -> checkpoint.loading -> engine.
from __future__ import annotations

TORCH = "torch"
OPENVINO = "openvino"
BACKENDS = (TORCH, OPENVINO)
# --quant modes an engine runs: fp32 (the parity reference), and weight-only int8 (per channel) / int4 (groups of 128)
ENGINE_MODES = {OPENVINO: ("none", "int8", "int4")}
# what installs each engine: the optional-dependency extra of pyproject.toml
INSTALL = {OPENVINO: "pip install 'tinygptv[openvino]'"}


def check_backend(backend: str, quant: str, device: str = "cpu") -> str:
    """A clear one-line error for a backend / mode / device the engine does not run."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == TORCH:
        return backend
    modes = ENGINE_MODES[backend]
    if quant not in modes:
        raise ValueError(f"--backend {backend} runs --quant {', '.join(modes)}, not {quant} (use --backend torch for "
                         f"{quant})")
    if str(device).split(":")[0] not in ("cpu", "auto"):
        raise ValueError(f"--backend {backend} runs on the CPU; --device {device} needs --backend torch")
    return backend
