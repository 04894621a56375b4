# --backend openvino on the tiny preset: the engine's fp32 logits equal PyTorch's (prefill over a left-padded batch,
# greedy decode steps), generate() / streaming / beam search / eval's shared prefix give PyTorch's answers, the
# compressed modes keep a trained model's answers, conversions are cached, reused and dropped with their model.
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("openvino", reason="--backend openvino needs OpenVINO: pip install 'tinygptv[openvino]'")
pytest.importorskip("nncf", reason="--backend openvino needs nncf: pip install 'tinygptv[openvino]'")

from conftest import QUESTION, tiny_model  # noqa: E402

from tinygptv.checkpoint.loading import engine_target, load_model  # noqa: E402
from tinygptv.checkpoint.native import save_pretrained  # noqa: E402
from tinygptv.cli import main  # noqa: E402
from tinygptv.data.image_processor import ImageProcessor  # noqa: E402
from tinygptv.data.templates import single_prompt  # noqa: E402
from tinygptv.engine import attach, openvino_export  # noqa: E402
from tinygptv.engine.attach import attach_engine  # noqa: E402
from tinygptv.engine.backends import check_backend  # noqa: E402
from tinygptv.engine.openvino_compile import COMPILED_DIR  # noqa: E402
from tinygptv.engine.openvino_llm import EngineState, OpenVINOCausalLM  # noqa: E402
from tinygptv.engine.openvino_vision import OpenVINOVisionTower  # noqa: E402
from tinygptv.engine.store import ENGINE_DIR, META, EngineFolder, engine_folder  # noqa: E402
from tinygptv.eval.runner import generate_shared_prefix  # noqa: E402
from tinygptv.model.generation import GenerationSettings  # noqa: E402
from tinygptv.model.streaming import stream_generate  # noqa: E402

PARITY = 1e-4  # the engine's fp32 logits against PyTorch's, relative to the largest logit


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYGPTV_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def with_engine(model, tmp_path, mode: str = "none"):
    """A copy of `model` with its LLM on OpenVINO (converted into a folder of the test's own)."""
    engine = copy.deepcopy(model)
    return attach_engine(engine, EngineFolder(tmp_path / f"openvino-{mode}", "test", "openvino", mode))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def padded_batch(model):
    """Two prompts of different lengths with an image each, left-padded as generate() pads them."""
    prompts = [single_prompt("stage3", "what colour is it?"), single_prompt("stage3", "is the shape round or not?")]
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    inputs = model.build_inputs(prompts, model.encode_image(pixels), add_bos=True, padding_side="left")
    return prompts, pixels, inputs


@torch.inference_mode()
def test_fp32_logits_equal_pytorch_at_prefill_and_decode(model, tmp_path):
    engine = with_engine(model, tmp_path)
    assert isinstance(engine.llm, OpenVINOCausalLM)
    _, _, inputs = padded_batch(model)
    mask = inputs.attention_mask
    assert (mask == 0).any()  # the batch really is padded
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    want = model.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=mask, position_ids=positions, use_cache=True)
    got = engine.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=mask, position_ids=positions, use_cache=True)
    real = mask.bool()  # padded positions attend to nothing; their logits are never read
    assert relative_error(got.logits[real], want.logits[real]) < PARITY
    want_cache, got_cache = want.cache, got.cache
    token = want.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(3):  # greedy decode steps, each continuing the cache of the step before
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        positions = positions[:, -1:] + 1
        want = model.llm(input_ids=token, attention_mask=mask, position_ids=positions, cache=want_cache,
                         use_cache=True)
        got = engine.llm(input_ids=token, attention_mask=mask, position_ids=positions, cache=got_cache,
                         use_cache=True)
        assert got.logits.shape == want.logits.shape == (2, 1, model.config.llm.vocab_size)
        assert relative_error(got.logits, want.logits) < PARITY
        assert got_cache.get_seq_length() == mask.shape[1]
        want_cache, got_cache = want.cache, got.cache
        token = want.logits[:, -1].argmax(-1, keepdim=True)


@torch.inference_mode()
def test_fp32_vision_tower_and_image_embeddings_equal_pytorch(model, tmp_path):
    engine = with_engine(model, tmp_path)
    assert isinstance(engine.visual_encoder, OpenVINOVisionTower)
    assert not list(engine.visual_encoder.parameters())  # PyTorch holds none of the tower's weights
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(2))  # any batch size
    assert relative_error(engine.visual_encoder(pixels), model.visual_encoder(pixels)) < PARITY
    assert relative_error(engine.encode_image(pixels), model.encode_image(pixels)) < PARITY
    with pytest.raises(ValueError, match="expected images of 28x28 px, got \\(32, 32\\)"):
        engine.encode_image(torch.zeros(1, 3, 32, 32))


@pytest.mark.slow
@torch.inference_mode()
def test_the_nano_models_cnn_tower_keeps_its_features_in_int8(colour_images, cache):
    """A load converts from bf16 weights; EfficientNet traced that way once came out of OpenVINO with features
    unrelated to PyTorch's (cosine 0.14; the easy-VQA score fell from 97 % to 58 %)."""
    reference = load_model("tinygptv-nano", quiet=True)
    engine = load_model("tinygptv-nano", backend="openvino", quant="int8", quiet=True)
    pixels = ImageProcessor(reference.config.vision)([colour_images["red"], colour_images["blue"]])
    want, got = reference.visual_encoder(pixels), engine.visual_encoder(pixels)
    assert got.shape == want.shape
    assert torch.nn.functional.cosine_similarity(got.flatten(1), want.flatten(1)).min() > 0.95  # 0.97-0.99 here


@torch.inference_mode()
def test_generate_streaming_and_beam_search_answer_as_pytorch(model, tmp_path):
    engine = with_engine(model, tmp_path)
    prompts, pixels, _ = padded_batch(model)
    for settings in (GenerationSettings(max_new_tokens=12), GenerationSettings(max_new_tokens=8, num_beams=3),
                     GenerationSettings(max_new_tokens=10, stop_strings=("a",))):
        assert engine.generate(pixels, prompts, settings=settings) == model.generate(pixels, prompts,
                                                                                   settings=settings)
    settings = GenerationSettings(max_new_tokens=12)
    pieces = list(stream_generate(engine, pixels[:1], prompts[0], settings))
    assert "".join(pieces).strip() == model.generate(pixels[:1], prompts[:1], settings=settings)[0]
    torch.manual_seed(3)
    sampled = engine.generate(pixels, prompts, temperature=1.0, max_new_tokens=6)
    torch.manual_seed(3)
    assert engine.generate(pixels, prompts, temperature=1.0, max_new_tokens=6) == sampled  # seeded like PyTorch


@torch.inference_mode()
def test_eval_shared_prefix_reorders_the_engine_cache(model, tmp_path):
    """eval runs each image's shared prompt start once and copies its K/V to every question of that image: a
    reordering that makes the batch larger, inside the engine."""
    engine = with_engine(model, tmp_path)
    prompts = [single_prompt("stage3", q) for q in ("what colour is it?", "what colour is the sky?",
                                                    "what shape is it?")]
    embeds = engine.encode_image(torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1)))
    embeds = embeds[[0, 0, 1]]
    settings = GenerationSettings(max_new_tokens=6)
    shared = generate_shared_prefix(engine, prompts, embeds, ["a", "a", "b"], settings)
    assert shared is not None
    assert shared == generate_shared_prefix(model, prompts, embeds.to(model.llm_dtype), ["a", "a", "b"], settings)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_compressed_modes_keep_a_trained_models_answers(trained_dir, colour_images, mode, cache):
    model = load_model(trained_dir, backend="openvino", quant=mode, quiet=True)
    assert isinstance(model.llm, OpenVINOCausalLM) and model.config.quant == mode
    assert isinstance(model.visual_encoder, OpenVINOVisionTower)
    assert model.connector.ln_vision.weight.dtype == torch.bfloat16  # the rest runs as PyTorch's int modes have it
    pixels = ImageProcessor(model.config.vision)([colour_images["red"], colour_images["blue"]])
    prompt = single_prompt("stage3", QUESTION)
    assert model.generate(pixels, [prompt, prompt], max_new_tokens=10) == ["red", "blue"]


def test_conversion_is_kept_beside_the_model_reused_and_dropped_on_save(tmp_path, monkeypatch, cache):
    folder = tmp_path / "model"
    save_pretrained(tiny_model(), folder)
    load_model(str(folder), backend="openvino", quant="int4", quiet=True)
    (converted,) = (folder / ENGINE_DIR).iterdir()
    assert converted.name.startswith("openvino-int4-") and (converted / META).is_file()
    compiled = sorted((converted / COMPILED_DIR).iterdir())  # OpenVINO's compiled model, imported by later loads
    assert compiled and all(p.stat().st_size > 0 for p in compiled)
    assert json.loads((converted / META).read_text())["mode"] == "int4"

    def no_export(*args, **kwargs):
        raise AssertionError("a cached conversion was converted again")

    monkeypatch.setattr(openvino_export, "export_llm", no_export)
    for part in attach.EXPORTERS:
        monkeypatch.setitem(attach.EXPORTERS, part, no_export)
    model = load_model(str(folder), backend="openvino", quant="int4", quiet=True)
    # of the LLM only the embedding table was read into PyTorch, of the vision tower nothing
    assert [k for k in model.state_dict() if k.startswith("llm.")] == ["llm.model.embed_tokens.weight"]
    assert not [k for k in model.state_dict() if k.startswith("visual_encoder.")]

    save_pretrained(tiny_model(seed=5), folder)  # new weights: the old conversion goes with the old weights
    assert not (folder / ENGINE_DIR).exists()
    _, _, target = engine_target(str(folder), "openvino", "int4")
    assert target.path.name != converted.name and not target.complete()


def test_loading_runs_the_engines_first_inference(cache, monkeypatch):
    """OpenVINO rearranges int4 weights at a model's first inference: loading does it, with one token, so the first
    answer of a chat or a server costs what later ones do."""
    shapes = []
    step = EngineState.step

    def counted(self, embeds, *args):
        shapes.append(tuple(embeds.shape))
        return step(self, embeds, *args)

    monkeypatch.setattr(EngineState, "step", counted)
    model = load_model("preset:tiny", backend="openvino", quant="int4", quiet=True)
    assert shapes == [(1, 1, model.config.llm.hidden_size)]


def test_presets_and_the_cache(cache):
    first = load_model("preset:tiny", backend="openvino", quant="int8", quiet=True)
    (converted,) = (cache / "engines").iterdir()
    again = load_model("preset:tiny", backend="openvino", quant="int8", quiet=True)
    assert [p.name for p in (cache / "engines").iterdir()] == [converted.name]
    pixels = torch.zeros(1, 3, 28, 28)
    prompt = single_prompt("stage3", "hello")
    assert first.generate(pixels, [prompt], max_new_tokens=5) == again.generate(pixels, [prompt], max_new_tokens=5)


def test_the_cache_keeps_each_models_conversion_and_drops_only_superseded_ones(cache):
    def fill(staged):
        (staged / "llm.xml").write_text("<net/>")

    first, other = (engine_folder({"model": n}, "openvino", "int4", None) for n in (1, 2))
    first.write(fill)
    other.write(fill)
    assert first.complete() and other.complete()  # two models' conversions side by side in the shared cache
    # the same model converted again by another engine version: its old conversion goes, the other model's stays
    newer = EngineFolder(first.path.parent / "openvino-int4-newer", "newer", "openvino", "int4", first.model)
    newer.write(fill)
    assert newer.complete() and not first.path.exists() and other.complete()


def test_unsupported_choices_and_a_missing_engine_are_clear(monkeypatch, cache):
    with pytest.raises(ValueError, match="--backend openvino runs --quant none, int8, int4, not int8-dynamic"):
        check_backend("openvino", "int8-dynamic")
    with pytest.raises(ValueError, match="runs on the CPU"):
        check_backend("openvino", "int4", "cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        check_backend("tensorrt", "int4")

    def missing(name, *args, **kwargs):
        if name == "openvino":
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args, **kwargs)

    real_import = __builtins__["__import__"] if isinstance(__builtins__, dict) else __builtins__.__import__
    monkeypatch.setattr("builtins.__import__", missing)
    with pytest.raises(ValueError, match=r"pip install 'tinygptv\[openvino\]'"):
        openvino_export.import_openvino()


@pytest.mark.slow
def test_ask_and_quantize_commands(trained_dir, colour_images, capsys, cache):
    assert main(["ask", "--model", trained_dir, "--backend", "openvino", "--quant", "int8", "--image",
                 colour_images["blue"], "--no-stream", QUESTION]) == 0
    assert capsys.readouterr().out.strip() == "blue"
    assert main(["quantize", trained_dir, "--quant", "int4", "--backend", "openvino", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backend"] == "openvino" and report["positions"] > 0
    assert 0 <= report["top1_agreement"] <= 1 and report["mean_kl"] >= 0
    _, _, folder = engine_target(trained_dir, "openvino", "int4")
    assert folder.complete()  # quantize kept the conversion where --backend openvino finds it
    assert main(["quantize", trained_dir, "--quant", "int4", "--backend", "openvino", "--out", "x"]) == 2
    assert "leave out --out" in capsys.readouterr().err


@pytest.mark.slow
def test_a_first_conversion_keeps_stdout_for_the_answer(tmp_path):
    """nncf logs a table of bit widths to the stdout it found when imported; in a fresh process (as a user runs
    it) the first `ask --backend openvino` converts, and stdout must still carry the answer alone, stderr no
    library warnings."""
    env = {**os.environ, "TINYGPTV_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "tinygptv.cli", "ask", "--model", "preset:tiny", "--backend",
                           "openvino", "--quant", "int8", "--max-new-tokens", "3", "--no-stream", "hello"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "converting the vision tower and language model" in done.stderr  # it did convert
    assert len(done.stdout.splitlines()) <= 1 and "nncf" not in done.stdout.lower(), done.stdout
    assert "Warning" not in done.stderr, done.stderr  # the tracer's expected warnings are not shown to the user
