# TinyGPT-V's LLM into OpenVINO, once per model and mode: our Phi / Llama module (LoRA merged) -> [trace LLMStep ->
# K/V made the model's own state -> weights compressed by nncf (int8 per channel / int4 groups of 128)] -> llm.xml +
# llm.bin in an engine folder (store.py). Only a cache miss runs this; loading a cached folder is openvino_llm.py.
from __future__ import annotations

import logging
import sys
import warnings
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from tinygptv.engine.backends import INSTALL, OPENVINO
from tinygptv.engine.step import INPUT_NAMES, LLMStep, example_inputs, kv_names

LLM_XML = "llm.xml"
LLM_BIN = "llm.bin"
# int4: symmetric codes, one scale per 128 inputs (the width of every Phi-2 input divides it); layers whose width
# does not (SmolLM2's 576 inputs) take the largest group size that does. Every layer is compressed, lm_head included,
# as the PyTorch int4 mode does: it is read at every token.
INT4_GROUP = 128


def import_openvino():
    """openvino, with a clear error naming the install command when it is missing."""
    try:
        import openvino
    except ImportError as e:
        raise ValueError(f"--backend openvino needs OpenVINO: {INSTALL[OPENVINO]}") from e
    return openvino


def import_nncf():
    """nncf (OpenVINO's weight compression), imported only when a model is converted: it takes seconds to import.
    Its INFO log (a table of bit widths) goes to stdout, where `tinygptv ask` prints only the answer: warnings only."""
    try:
        import nncf
    except ImportError as e:
        raise ValueError(f"converting a model for --backend openvino needs nncf: {INSTALL[OPENVINO]}") from e
    nncf.set_log_level(logging.WARNING)
    return nncf


class _ReadAsFloat32(nn.Module):
    """A weight stored in bf16, read through a cast to fp32: the traced graph keeps the bf16 constant (nncf compresses
    it from there) and computes in fp32."""

    def forward(self, weight):
        return weight.float()


@contextmanager
def weights_read_as_float32(module: nn.Module):
    """Within the block, every bf16 / fp16 parameter of `module` reads as fp32 (it is traced there); afterwards
    they are plain parameters again. Converting from a bf16 LLM halves the memory of a conversion (5.6 GB instead of
    11 for Phi-2), and the int8 / int4 codes made from bf16 weights are those of the fp32 weights up to bf16's
    rounding, far below theirs."""
    cast = [(owner, name) for owner in module.modules() for name, param in owner.named_parameters(recurse=False)
            if param.is_floating_point() and param.dtype != torch.float32]
    for owner, name in cast:
        parametrize.register_parametrization(owner, name, _ReadAsFloat32(), unsafe=True)
    try:
        yield module
    finally:
        for owner, name in cast:
            parametrize.remove_parametrizations(owner, name, leave_parametrized=False)


@contextmanager
def quiet_tracing():
    """Tracing our LLM or vision tower makes torch and transformers warn about what a trace cannot follow (Python
    booleans of shapes, deprecated attributes walked by the tracer, an unset loss type): expected here, since the
    exported graph is checked against PyTorch (tests/test_engine.py), and noise to a user whose first `ask`
    converts."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def convert_llm(llm: nn.Module):
    """The LLM as an OpenVINO model: inputs inputs_embeds [B, S, D] f32, attention_mask [B, P + S] i64, position_ids
    [B, S] i64, logits_index [K] i64; output logits [B, K, V]; the K/V of every layer is a state variable (past.N.key
    -> present.N.key) that the engine appends to in place, so no cache crosses the Python boundary per token."""
    ov = import_openvino()
    with torch.no_grad(), weights_read_as_float32(llm), quiet_tracing():
        model = ov.convert_model(LLMStep(llm).eval(), example_input=example_inputs(llm))
    num_layers = llm.config.num_hidden_layers
    for port, name in zip(model.inputs, (*INPUT_NAMES, *kv_names("past", num_layers))):
        port.get_tensor().set_names({name})
    for port, name in zip(model.outputs, ("logits", *kv_names("present", num_layers))):
        port.get_tensor().set_names({name})
    from openvino.passes import MakeStateful, Manager  # openvino is optional: imported with it, above

    manager = Manager()
    manager.register_pass(MakeStateful(dict(zip(kv_names("past", num_layers), kv_names("present", num_layers)))))
    manager.run_passes(model)
    return model


def compress_weights(model, mode: str):
    """nncf's weight-only compression of every MatMul weight: int8 asymmetric per output channel, or int4 symmetric
    in groups of INT4_GROUP (smaller where a layer's width needs it). 'none' keeps fp32: the parity reference."""
    if mode == "none":
        return model
    nncf = import_nncf()
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

    if mode == "int8":
        settings = {"mode": nncf.CompressWeightsMode.INT8_ASYM}
    elif mode == "int4":
        settings = {"mode": nncf.CompressWeightsMode.INT4_SYM, "group_size": INT4_GROUP, "ratio": 1.0,
                    "all_layers": True, "advanced_parameters": AdvancedCompressionParameters(
                        group_size_fallback_mode=GroupSizeFallbackMode.ADJUST)}
    else:
        raise ValueError(f"--backend openvino runs --quant none, int8 or int4, not {mode}")
    with redirect_stdout(sys.stderr):  # nncf's progress bar: stdout carries answers and --json reports
        return nncf.compress_weights(model, **settings)


def export_llm(llm: nn.Module, mode: str, folder: Path) -> None:
    """Write llm.xml / llm.bin for `llm` at `mode` into `folder` (a staging folder of atomic.writing_dir)."""
    ov = import_openvino()
    model = compress_weights(convert_llm(llm), mode)
    ov.save_model(model, Path(folder) / LLM_XML, compress_to_fp16=False)  # fp32 stays fp32: the parity reference
