# Quantization (tinygptv.quant): the int8 / int4 layers compute what their codes say, a quantized model keeps its
# answers, saved quantized copies load back exactly, presets build straight into the quantized form.
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import QUESTION, tiny_model
from tinygptv.cli import main
from tinygptv.config import preset
from tinygptv.data.image_processor import ImageProcessor
from tinygptv.data.templates import single_prompt
from tinygptv.model.generation import GenerationSettings
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.quant.apply import build_random_quantized, check_mode, quantize_model, weight_bytes_per_token
from tinygptv.quant.cpu_linear import Int4Linear, Int8DynamicLinear, Int8Linear
from tinygptv.quant.modes import modes_for
from tinygptv.quant.bnb_linear import bnb_from_linear, bnb_weight_bytes
from tinygptv.serve.chat import ChatSession
from tinygptv.checkpoint.loading import load_model
from tinygptv.checkpoint.native import load_pretrained


def dequantized(q: Int4Linear) -> torch.Tensor:
    """[N, K] fp32: what the int4 kernel multiplies by, read back through the kernel itself (an identity input)."""
    eye = torch.eye(q.in_features, dtype=torch.bfloat16)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, q.weight_int4pack, q.group_size,
                                                      q.scales_and_zeros).float().t()  # [K, N] -> [N, K]


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(256, 96).eval()


def test_int8_layer_matches_its_codes_and_the_original(linear):
    q = Int8Linear.from_linear(linear)
    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.abs().max() == 127
    dequant = q.weight_int8.float() * q.weight_scale.float()[:, None]
    assert (dequant - linear.weight).abs().max() <= linear.weight.abs().max() / 127  # half a step, bf16 scale
    x = torch.randn(5, 256)
    y = q(x)
    expected = x.bfloat16().float() @ dequant.T + linear.bias.bfloat16().float()
    assert torch.allclose(y, expected, rtol=2e-2, atol=2e-2)
    assert (y - linear(x)).abs().max() < 0.05 * linear(x).abs().max()


def test_int4_layer_matches_its_codes_and_keeps_groups(linear):
    q = Int4Linear.from_linear(linear)
    assert q.group_size == 128 and q.weight_int4pack.dtype == torch.uint8 and q.weight_int4pack.numel() == 96 * 128
    x = torch.randn(5, 256)
    expected = x.bfloat16().float() @ dequantized(q).T + linear.bias.bfloat16().float()
    assert torch.allclose(q(x), expected, rtol=2e-2, atol=3e-2)
    step = (linear.weight.reshape(96, 2, 128).amax(-1) - linear.weight.reshape(96, 2, 128).amin(-1)) / 15
    assert ((dequantized(q) - linear.weight).abs().reshape(96, 2, 128).amax(-1) <= step * 0.51 + 1e-2).all()
    assert Int4Linear.from_linear(nn.Linear(96, 16)).group_size == 32  # the widest group that divides the input
    for shape in ((100, 16), (96, 8)):
        with pytest.raises(ValueError, match="does not fit the kernel"):
            Int4Linear(*shape, bias=False)


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear, Int8DynamicLinear])
def test_layers_take_non_contiguous_inputs(cls, linear):
    """Attention and cache reordering hand the projections transposed views; the kernels need contiguous rows."""
    q = cls.from_linear(linear)
    x = torch.randn(256, 4).t()  # [4, 256], not contiguous
    assert not x.is_contiguous()
    assert torch.equal(q(x), q(x.contiguous()))


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear, Int8DynamicLinear])
def test_row_blocks_give_the_same_layer_and_leave_the_original_alone(cls, linear, monkeypatch):
    """Big layers are quantized a block of rows at a time (no fp32 copy of a whole lm_head); the result must not
    depend on the block size, and the in-place arithmetic must not write into the caller's weights."""
    import tinygptv.quant.cpu_linear as cpu_linear

    before = linear.weight.detach().clone()
    whole = cls.from_linear(linear).state_dict()
    monkeypatch.setattr(cpu_linear, "ROWS_AT_ONCE", 64)  # 96 rows: a block of 64 and one of 32
    blocked = cls.from_linear(linear).state_dict()
    assert torch.equal(linear.weight, before)
    assert whole.keys() == blocked.keys() and all(torch.equal(whole[k], blocked[k]) for k in whole)


def test_int8_dynamic_layer_is_close(linear):
    q = Int8DynamicLinear.from_linear(linear)
    x = torch.randn(5, 256)
    assert (q(x) - linear(x)).abs().max() < 0.05 * linear(x).abs().max()


def assert_answers_survive(model, colour_images, trained_dir, mode, capsys, device="cpu"):
    """Each image's own colour stays the likelier answer by a margin, and --quant reaches the model the CLI answers
    with (the same words as a ChatSession on this model)."""
    pixels = ImageProcessor(model.config.vision)([colour_images["red"], colour_images["blue"]])
    prompt = single_prompt("stage3", QUESTION)
    with torch.inference_mode():
        right = model(pixels, [prompt] * 2, ["red", "blue"]).loss
        wrong = model(pixels, [prompt] * 2, ["blue", "red"]).loss
    assert right + 0.5 < wrong
    session = ChatSession(model, settings=GenerationSettings(max_new_tokens=8))
    session.set_image(colour_images["red"])
    assert main(["ask", "--model", trained_dir, "--quant", mode, "--device", device, "--image", colour_images["red"],
                 "--max-new-tokens", "8", "--no-stream", QUESTION]) == 0
    assert capsys.readouterr().out.strip() == session.ask(QUESTION)


@pytest.mark.parametrize("mode", ["bf16", "int8", "int4", "int8-dynamic"])
def test_quantized_copy_keeps_answers_and_loads_back_exactly(mode, trained_dir, colour_images, tmp_path, capsys):
    model = load_model(trained_dir, quant=mode)
    assert model.config.quant == mode and model.config.lora.r == 0
    kinds = {type(m) for m in model.llm.modules()}
    if mode != "bf16":
        assert nn.Linear not in kinds  # every LLM linear was swapped (tiny widths are multiples of 32)
    assert_answers_survive(model, colour_images, trained_dir, mode, capsys)
    # tinygptv quantize: a report, then a folder that loads as it was saved
    out = tmp_path / "q"
    assert main(["quantize", trained_dir, "--quant", mode, "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["positions"] > 50 and 0.5 <= report["top1_agreement"] <= 1 and report["mean_kl"] >= 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["quant"] == mode and saved["base_model"] is None
    again = load_pretrained(out)
    ids = [model.tokenize(QUESTION)]
    with torch.inference_mode():
        a = model.llm(input_ids=torch.tensor(ids)).logits
        b = again.llm(input_ids=torch.tensor(ids)).logits
    assert torch.equal(a, b)
    other = "int4" if mode != "int4" else "int8"
    with pytest.raises(ValueError, match=f"saved quantized as {mode}"):
        load_model(str(out), quant=other)


MISALIGNED_LOAD = """
import torch
from torch import nn
from tinygptv.quant.cpu_linear import {cls}
torch.manual_seed(0)
layer = {cls}.from_linear(nn.Linear(256, 96))
state = {{}}
for key, value in layer.state_dict().items():  # each tensor 4 bytes past an aligned start, as a file can give it
    raw = torch.zeros(value.numel() * value.element_size() + 4, dtype=torch.uint8)
    state[key] = raw[4:].view(value.dtype).view(value.shape)
    state[key].copy_(value)
fresh = {cls}(256, 96, bias=True)
fresh.load_state_dict(state, assign=True)
x = torch.randn(8, 256)
assert torch.equal(fresh(x), layer(x))
"""


@pytest.mark.parametrize("cls", ["Int8Linear", "Int4Linear"])
def test_weights_read_from_any_byte_of_a_file_do_not_crash_the_kernel(cls):
    """torch._weight_int8pack_mm crashed the process (SIGSEGV) on buffers that did not start on a 64-byte boundary,
    as safetensors gives them; in a subprocess, so a crash fails this test instead of the whole run."""
    done = subprocess.run([sys.executable, "-c", MISALIGNED_LOAD.format(cls=cls)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-1500:]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_copy_of_a_tied_head_model_answers_from_the_cli(mode, tmp_path, capsys):
    """The nano model's LM ties lm_head to the embedding; its quantized copy stores the head's own codes and every
    command loads it (it was refused with "Unexpected key(s): llm.lm_head.weight")."""
    out = tmp_path / mode
    assert main(["quantize", "tinygptv-nano", "--quant", mode, "--out", str(out)]) == 0
    image = Path(__file__).resolve().parent.parent / "examples" / "red_circle.png"
    question = ["--image", str(image), "--task", "vqa", "--no-stream", "What color is the shape?"]
    capsys.readouterr()
    assert main(["ask", "--model", str(out), *question]) == 0
    from_copy = capsys.readouterr().out.strip()
    assert main(["ask", "--quant", mode, *question]) == 0
    assert from_copy == capsys.readouterr().out.strip() and from_copy


def test_preset_builds_directly_quantized_with_the_expected_bytes():
    fp32 = tiny_model().merge_lora()
    int8 = build_random_quantized(preset("tiny"), "int8")
    int4 = build_random_quantized(preset("tiny"), "int4")
    assert not any(p.is_meta for p in int4.parameters()) and not any(b.is_meta for b in int4.buffers())
    assert all(p.dtype == torch.bfloat16 for p in int4.parameters())
    linear_fp32 = sum(m.weight.numel() * 4 for m in fp32.llm.modules() if type(m) is nn.Linear)
    linear_int8 = sum(m.weight_bytes for m in int8.llm.modules() if isinstance(m, Int8Linear))
    assert linear_fp32 / 4 <= linear_int8 <= linear_fp32 / 4 * 1.1  # one byte a weight plus scales
    b32, b8, b4 = (weight_bytes_per_token(m.llm) for m in (fp32, int8, int4))
    assert b4 < b8 < b32 / 2
    ids = torch.tensor([fp32.tokenize("hello")])
    with torch.inference_mode():  # the bf16 / int4 kernels run end to end on the quantized build
        assert torch.isfinite(int4.llm(input_ids=ids).logits).all()


@pytest.mark.parametrize("name", ["tiny", "nano"])  # untied Phi, tied Llama
def test_weight_bytes_per_token_by_hand(name):
    """Every LLM parameter except the embedding table, read one row per token; a tied lm_head reads it whole. The
    bench counts every row with this function, its stock reference LLM included."""
    with torch.device("meta"):
        llm = TinyGPTV(preset(name)).llm
    emb = llm.get_input_embeddings().weight
    table, row = emb.numel() * emb.element_size(), emb.shape[1] * emb.element_size()
    by_hand = sum(p.numel() * p.element_size() for p in llm.parameters()) - table + row  # a tied table counted once
    if llm.get_output_embeddings().weight is emb:
        by_hand += table
    assert weight_bytes_per_token(llm) == by_hand


def test_unknown_mode_and_dtype_with_quant_are_refused():
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        load_model("tiny", quant="int3", quiet=True)
    with pytest.raises(ValueError, match="either a dtype or a quantization"):
        load_model("tiny", dtype=torch.bfloat16, quant="int8", quiet=True)
    model = tiny_model()
    quantize_model(model, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "int4")


@pytest.mark.parametrize("mode", ["bnb-int8", "bnb-nf4"])
def test_bitsandbytes_layers_quantize_on_their_device(mode, linear):
    """bitsandbytes' own CPU backend runs the same layers as CUDA, so the conversion is checked here too."""
    q = bnb_from_linear(linear, mode, "cpu")
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    if mode == "bnb-int8":
        assert q.weight.dtype == torch.int8 and q.weight.shape == (96, 256) and q.weight.SCB.shape == (96,)
        tolerance = 0.03
    else:
        assert q.weight.dtype == torch.uint8 and q.weight.numel() == 96 * 256 // 2  # two 4-bit codes a byte
        assert q.weight.quant_state.blocksize == 64 and q.weight.quant_state.quant_type == "nf4"
        tolerance = 0.15
    reference = linear(x.float())
    assert (q(x).float() - reference).abs().max() < tolerance * reference.abs().max()
    fp32_bytes = linear.weight.numel() * 4
    assert fp32_bytes / 8 < bnb_weight_bytes(q) < fp32_bytes / (3.5 if mode == "bnb-int8" else 6)


@pytest.mark.parametrize("mode", ["bnb-int8", "bnb-nf4"])
def test_bitsandbytes_modes_keep_answers_and_are_report_only(mode, trained_dir, colour_images, tmp_path, capsys):
    model = load_model(trained_dir, quant=mode)
    assert model.config.quant == mode
    assert not any(type(m) is nn.Linear for m in model.llm.modules())
    assert {type(m).__name__ for m in model.llm.modules()} >= {"Linear8bitLt" if mode == "bnb-int8" else "Linear4bit"}
    assert_answers_survive(model, colour_images, trained_dir, mode, capsys)
    assert main(["quantize", trained_dir, "--quant", mode, "--report-only", "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["positions"] > 50 and 0.5 <= report["top1_agreement"] <= 1
    assert main(["quantize", trained_dir, "--quant", mode, "--out", str(tmp_path / "q")]) == 2
    assert f"{mode} is not saved: bitsandbytes quantizes" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_modes_are_checked_against_the_device(capsys):
    assert "bnb-nf4" not in modes_for("cpu") and "int4" in modes_for("cpu")
    assert "int4" not in modes_for("cuda") and {"none", "bf16", "bnb-int8", "bnb-nf4"} <= set(modes_for("cuda"))
    with pytest.raises(ValueError, match="--quant int4 runs PyTorch's CPU kernels; on cuda use bnb-int8 or bnb-nf4"):
        check_mode("int4", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda, but torch sees no CUDA device"):
            load_model("tiny", device="cuda", quiet=True)
    assert main(["ask", "--model", "tiny", "--device", "tpu", "hello"]) == 2
    assert "--device 'tpu': not a device" in capsys.readouterr().err
    assert main(["ask", "--model", "tiny", "--device", "meta", "hello"]) == 2
    assert "--device 'meta': only cpu and cuda are supported" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
@pytest.mark.parametrize("mode", ["none", "bf16", "bnb-int8", "bnb-nf4"])
def test_cuda_modes_answer_on_the_gpu(mode, trained_dir, colour_images, capsys):
    model = load_model(trained_dir, quant=mode, device="cuda")
    assert model.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert_answers_survive(model, colour_images, trained_dir, mode, capsys, device="cuda")
