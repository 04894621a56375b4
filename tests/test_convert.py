# Tests for the official-weights converter: official files -> convert_official -> our folder ->
# TinyGPTV.from_pretrained. Exactness is checked against a forward written here from the raw official/Phi-2 tensors
# and the spec's formulas, so a renaming or re-ordering mistake cannot hide behind shared code.
from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from official_fixtures import (
    REAL,
    ROPE,
    TINY,
    Dims,
    blip2_weights,
    eva_weights,
    llm_prefix,
    phi2_weights,
    stage_run_config,
    stage_weights,
    write_blip2,
    write_eva,
    write_official_set,
    write_phi2,
    write_stage_checkpoint,
)
from tinygptv.atomic import OutputError
from tinygptv.checkpoint.native import CheckpointError
from tinygptv.model.weights import align_lora_names
from tinygptv.checkpoint.official import LoadedFile, convert_official, plan_loaded, plan_official
from tinygptv.checkpoint.phi2 import LAYOUT_FUSED, LAYOUT_SPLIT, fuse_qkv, phi2_from_tensors, read_phi2
from tinygptv.config import LLMConfig, VisionConfig, preset
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.model.vision.eva_vit import EvaViT, adapt_state_dict
from tinygptv.checkpoint.native import load_pretrained

HEADS = dict(vit_heads=TINY.vit_heads, qformer_heads=TINY.q_heads)  # the two dims no shape reveals


def _convert(files, out, **kwargs):
    return convert_official(files.official, files.phi2, files.eva, files.blip2, out, quiet=True, **HEADS, **kwargs)


def _plan(files, **kwargs):
    return plan_official(files.official, files.phi2, files.eva, files.blip2, **HEADS, **kwargs)


# --- the independent reference --------------------------------------------------------------------------------------


def _layer_norm(x, weight, bias, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight + bias


def _gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _rotate(t, cos, sin, rd):
    """Partial RoPE, rotate_half style, on the first rd dims of each head."""
    rot, rest = t[..., :rd], t[..., rd:]
    half = rd // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


def reference_logits(phi, official, dims: Dims, layout, stage, embeds, lora_alpha):
    b, s, d = embeds.shape
    h, dh = dims.heads, d // dims.heads
    theta, partial = ROPE[layout]
    rd = int(dh * partial)
    inv_freq = 1.0 / (theta ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
    angles = torch.arange(s, dtype=torch.float32)[:, None] * inv_freq[None]  # [S, rd/2]
    cos, sin = torch.cat((angles.cos(), angles.cos()), -1), torch.cat((angles.sin(), angles.sin()), -1)  # [S, rd]
    causal = torch.full((s, s), float("-inf")).triu(1)
    pre = llm_prefix(stage)
    scale = lora_alpha / dims.lora_r

    def lora(x, target, i):
        if stage == 1:
            return 0.0
        keys = [k for k in official if k.startswith(f"{pre}layers.{i}.self_attn.{target}.lora_")]
        a = official[next(k for k in keys if ".lora_A." in k)]
        bb = official[next(k for k in keys if ".lora_B." in k)]
        return scale * (x @ a.T @ bb.T)

    x = embeds
    for i in range(dims.layers):
        p, o = f"model.layers.{i}.", f"{pre}layers.{i}."
        hid = _layer_norm(x, official[f"{o}input_layernorm.weight"], phi[f"{p}input_layernorm.bias"], 1e-5)
        if layout == "fused":  # rows (head, q/k/v, head_dim)
            w = phi[f"{p}self_attn.query_key_value.weight"].view(h, 3, dh, d)
            bias = phi[f"{p}self_attn.query_key_value.bias"].view(h, 3, dh)
            wq, wk, wv = w[:, 0], w[:, 1], w[:, 2]  # [H, Dh, D]
            bq, bk, bv = bias[:, 0], bias[:, 1], bias[:, 2]
        else:
            wq, wk, wv = (phi[f"{p}self_attn.{n}.weight"].view(h, dh, d) for n in ("q_proj", "k_proj", "v_proj"))
            bq, bk, bv = (phi[f"{p}self_attn.{n}.bias"].view(h, dh) for n in ("q_proj", "k_proj", "v_proj"))
        q = torch.einsum("bsd,hed->bhse", hid, wq) + bq[None, :, None]
        k = torch.einsum("bsd,hed->bhse", hid, wk) + bk[None, :, None]
        v = torch.einsum("bsd,hed->bhse", hid, wv) + bv[None, :, None]
        delta = lora(hid, "query_key_value", i)
        if stage > 1:  # the LoRA B rows follow the same (head, q/k/v, head_dim) order
            delta = delta.view(b, s, h, 3, dh).permute(3, 0, 2, 1, 4)  # [3, B, H, S, Dh]
            q, k, v = q + delta[0], k + delta[1], v + delta[2]
        zero = torch.zeros(dh)
        q = _layer_norm(q, official[f"{o}self_attn.q_layernorm.weight"], zero, 1e-5)
        k = _layer_norm(k, official[f"{o}self_attn.k_layernorm.weight"], zero, 1e-5)
        q, k = _rotate(q, cos, sin, rd), _rotate(k, cos, sin, rd)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh) + causal, dim=-1)
        out = (att @ v).transpose(1, 2).reshape(b, s, d)
        out = out @ phi[f"{p}self_attn.dense.weight"].T + phi[f"{p}self_attn.dense.bias"] + lora(out, "dense", i)
        attn = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + 1e-6) * official[f"{o}post_layernorm.weight"]
        mlp = _gelu_new(hid @ phi[f"{p}mlp.fc1.weight"].T + phi[f"{p}mlp.fc1.bias"])
        mlp = mlp @ phi[f"{p}mlp.fc2.weight"].T + phi[f"{p}mlp.fc2.bias"]
        x = x + attn + mlp
    x = _layer_norm(x, official[f"{pre}final_layernorm.weight"], phi["model.final_layernorm.bias"], 1e-5)
    return x @ phi["lm_head.weight"].T + phi["lm_head.bias"]


def _lavis_qformer_to_hf(sd):
    """Our own rename for the reference (independent of the converter's table)."""
    out = {}
    for key, value in sd.items():
        if not key.startswith("Qformer.bert.") or "embeddings.word" in key or "embeddings.position" in key:
            continue
        if re.match(r"^Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.", key):
            continue
        key = key.replace("Qformer.bert.embeddings.LayerNorm", "layernorm").replace("Qformer.bert.", "")
        out[key.replace(".attention.self.", ".attention.attention.")
                .replace(".crossattention.self.", ".crossattention.attention.")] = value
    return out


def reference_image_embeds(eva, blip2, official, dims: Dims, image_size, with_qformer, pixels):
    cfg = VisionConfig(image_size=image_size, patch_size=dims.vit_patch, width=dims.vit_width, depth=dims.vit_depth,
                       heads=dims.vit_heads, mlp_dim=dims.vit_mlp, pretrain_image_size=dims.image_size)
    vit = EvaViT(cfg)
    vit.load_state_dict(adapt_state_dict(eva, cfg), strict=True)  # drops the file's extra last block
    tokens = vit(pixels)
    tokens = F.layer_norm(tokens, (dims.vit_width,), blip2["ln_vision.weight"], blip2["ln_vision.bias"], 1e-5)
    source = official if with_qformer else blip2
    qformer = Blip2QFormerModel(Blip2QFormerConfig(
        hidden_size=dims.q_hidden, num_hidden_layers=dims.q_layers, num_attention_heads=dims.q_heads,
        intermediate_size=dims.q_inter, cross_attention_frequency=dims.q_cross_freq,
        encoder_hidden_size=dims.vit_width, layer_norm_eps=1e-12, use_qformer_text_input=False,
    )).eval()
    qformer.load_state_dict(_lavis_qformer_to_hf(source), strict=True)
    queries = qformer(query_embeds=source["query_tokens"], encoder_hidden_states=tokens).last_hidden_state
    x = F.linear(queries, official["llama_proj.weight"], official["llama_proj.bias"])
    return F.linear(x, official["llama_proj2.weight"], official["llama_proj2.bias"])


# --- exactness ------------------------------------------------------------------------------------------------------

CASES = [
    # (stage, Phi-2 layout, LoRA keys with ".default.", Phi-2 weight format, shards)
    (1, "fused", False, "safetensors", 1),
    (1, "split", False, "bin", 2),
    (3, "fused", False, "safetensors", 2),
    (3, "fused", True, "bin", 1),
    (3, "split", False, "safetensors", 1),
    (3, "split", True, "safetensors", 2),
    (4, "fused", False, "safetensors", 1),
    (4, "fused", True, "safetensors", 1),
    (4, "split", False, "bin", 1),
    (4, "split", True, "safetensors", 1),
]


@pytest.mark.parametrize("stage,layout,lora_default,fmt,shards", CASES)
def test_conversion_is_exact(tmp_path, stage, layout, lora_default, fmt, shards):
    with_qformer = stage == 4
    files = write_official_set(tmp_path, stage=stage, layout=layout, lora_default=lora_default,
                               with_qformer=with_qformer, fmt=fmt, shards=shards)
    model = load_pretrained(_convert(files, tmp_path / "out"))
    cfg = model.config
    image_size = TINY.image_size * (2 if stage == 4 else 1)  # read from the checkpoint's run config
    assert cfg.lora.r == (0 if stage == 1 else TINY.lora_r)
    assert cfg.vision.image_size == image_size and cfg.vision.depth == TINY.vit_depth
    assert cfg.prompt.template == {1: "none", 3: "stage3", 4: "stage4"}[stage]
    assert cfg.prompt.bos_at_inference is False

    official = torch.load(files.official, weights_only=True)["model"]
    phi = phi2_weights(TINY, layout=layout)
    torch.manual_seed(0)
    embeds = torch.randn(2, 7, TINY.hidden)
    with torch.no_grad():
        logits = model.llm(inputs_embeds=embeds).logits
    expected = reference_logits(phi, official, TINY, layout, stage, embeds, TINY.lora_alpha)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)

    pixels = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        image = model.encode_image(pixels)
        expected_image = reference_image_embeds(eva_weights(TINY), blip2_weights(TINY), official, TINY, image_size,
                                                with_qformer, pixels)
    assert image.shape == (2, TINY.q_queries, TINY.hidden)
    torch.testing.assert_close(image, expected_image, atol=1e-5, rtol=1e-5)


def test_stage4_without_trained_qformer_keeps_blip2s(tmp_path):
    """The Jan-2024 stage-4 file (frozen Q-Former): the image path comes from BLIP-2, and stage/size args win."""
    files = write_official_set(tmp_path, stage=4, with_qformer=False, with_config=False)
    model = load_pretrained(_convert(files, tmp_path / "out", stage=4, image_size=2 * TINY.image_size))
    official = torch.load(files.official, weights_only=True)["model"]
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        expected = reference_image_embeds(eva_weights(TINY), blip2_weights(TINY), official, TINY, 56, False, pixels)
        torch.testing.assert_close(model.encode_image(pixels), expected, atol=1e-5, rtol=1e-5)
    assert model.config.prompt.template == "stage4" and model.config.prompt.max_txt_len == 1024


def test_fuse_qkv_orders_rows_head_role_dim():
    heads, dh, d_in = 3, 2, 5
    q, k, v = (torch.randn(heads * dh, d_in) for _ in range(3))
    fused = fuse_qkv(q, k, v, heads)
    for head in range(heads):
        for role, src in enumerate((q, k, v)):
            for j in range(dh):
                assert torch.equal(fused[head * 3 * dh + role * dh + j], src[head * dh + j])
    assert torch.equal(fuse_qkv(q[:, 0], k[:, 0], v[:, 0], heads), fused[:, 0])  # biases fuse the same way


def test_phi2_layouts_agree_and_config_is_read(tmp_path):
    split = phi2_weights(TINY, layout="split")
    fused_from_split = {}
    for i in range(TINY.layers):
        p = f"model.layers.{i}.self_attn."
        for n in ("weight", "bias"):
            fused_from_split[f"{p}query_key_value.{n}"] = fuse_qkv(
                *(split[f"{p}{proj}.{n}"] for proj in ("q_proj", "k_proj", "v_proj")), TINY.heads)

    def as_fused(sd):  # the split weights, fused by hand, written in the 4.36 layout (with the 4.36 config)
        sd.clear()
        sd.update({k: v for k, v in split.items() if not re.search(r"\.(q|k|v)_proj\.", k)}, **fused_from_split)

    a = read_phi2(write_phi2(tmp_path / "split", layout="split", fmt="bin", shards=3))
    b = read_phi2(write_phi2(tmp_path / "fused", layout="fused", edit=as_fused))
    assert (a.layout, b.layout) == (LAYOUT_SPLIT, LAYOUT_FUSED)
    assert a.state.keys() == b.state.keys()
    for key in a.state:
        assert torch.equal(a.state[key], b.state[key]), key
    assert (a.config.rope_theta, a.config.partial_rotary_factor) == ROPE["split"]
    assert (b.config.rope_theta, b.config.partial_rotary_factor) == ROPE["fused"]
    assert a.config.pad_token_id == a.config.eos_token_id == TINY.eos
    assert (a.config.num_layers, a.config.num_heads, a.config.intermediate_size) == (2, 4, 128)


def test_stage1_has_no_lora_and_the_report_lists_every_skip(tmp_path):
    files = write_official_set(tmp_path, stage=1, with_config=False)
    (tmp_path / "eva_vit_g.pth").unlink()
    write_eva(tmp_path, under_model=True, extra_heads=True)
    plan = _plan(files)
    assert plan.config.lora.r == 0 and plan.stage == 1
    assert not any(".lora_" in k for k in plan.state)
    text_path = [k for rule, keys in plan.report("BLIP-2").skipped.items() if "text-path" in rule for k in keys]
    assert "Qformer.bert.encoder.layer.0.intermediate.dense.weight" in text_path
    assert "Qformer.bert.encoder.layer.1.output.LayerNorm.bias" in text_path
    assert not any("output_query" in k or "intermediate_query" in k for k in text_path)
    skipped_blip2 = {k for keys in plan.report("BLIP-2").skipped.values() for k in keys}
    assert {"Qformer.cls.predictions.bias", "t5_proj.weight", "temp", "itm_head.weight",
            "Qformer.bert.embeddings.position_ids"} <= skipped_blip2
    eva_skips = plan.report("EVA ViT").skipped
    assert any("blocks.2.mlp.fc1.weight" in keys for keys in eva_skips.values())
    assert any("head.weight" in keys for keys in eva_skips.values())
    # An empty run config tells nothing, so it is listed with the entries never read.
    assert plan.report("TinyGPT-V checkpoint").ignored_entries == ["optimizer", "config", "scaler", "epoch"]
    assert any("image size not recorded" in n for n in plan.notes)
    model = load_pretrained(_convert(files, tmp_path / "out"))
    assert model.config.lora.r == 0 and model.config.vision.image_size == 224
    assert not any(".lora_" in k for k in model.state_dict())


def test_raw_state_dict_and_default_alpha(tmp_path):
    files = write_official_set(tmp_path, stage=3)
    write_stage_checkpoint(tmp_path, stage=3, raw=True)  # bare state dict: no config, so alpha falls back to 16
    plan = _plan(files, stage=3, image_size=TINY.image_size)
    assert plan.config.lora.alpha == 16 and plan.config.lora.r == TINY.lora_r
    assert any("lora_alpha" in n for n in plan.notes)
    assert plan.report("TinyGPT-V checkpoint").ignored_entries == []


def test_output_folder_holds_the_phi2_tokenizer_files(tmp_path):
    files = write_official_set(tmp_path, stage=3)
    out = _convert(files, tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (files.phi2 / name).read_bytes()
    assert json.loads((out / "config.json").read_text())["base_model"] is None
    model = load_pretrained(out)
    assert model.tokenize("hi") == [ord("h"), ord("i")]


# --- every key accounted for ----------------------------------------------------------------------------------------

PEFT = llm_prefix(3)


def _delete(key):
    def edit(sd):
        del sd[key]
    return edit


def _add(key, shape=(3,)):
    def edit(sd):
        sd[key] = torch.zeros(shape)
    return edit


def _reshape(key, shape):
    def edit(sd):
        sd[key] = torch.zeros(shape)
    return edit


OFFICIAL_DAMAGE = [
    (_add("llama_proj3.weight"), r"unexpected keys.*llama_proj3\.weight"),
    (_add(f"{PEFT}layers.0.self_attn.dense.lora_C.weight"), r"unexpected keys.*dense\.lora_C\.weight"),
    (_delete(f"{PEFT}layers.1.self_attn.dense.lora_B.weight"), r"missing keys.*layers\.1\.self_attn\.dense\.lora_B"),
    (_delete(f"{PEFT}layers.1.self_attn.q_layernorm.weight"), r"missing keys.*layers\.1\.self_attn\.q_layernorm"),
    (_delete("llama_proj2.bias"), r"missing keys.*llama_proj2\.bias"),
    (_reshape(f"{PEFT}layers.0.post_layernorm.weight", (65,)),
     r"wrong shapes.*layers\.0\.post_layernorm\.weight: \(65,\), expected \(64,\)"),
    (_reshape(f"{PEFT}layers.1.self_attn.query_key_value.lora_B.weight", (191, TINY.lora_r)),
     r"wrong shapes.*layers\.1\.self_attn\.query_key_value\.lora_B\.weight: \(191, 8\)"),
    (_reshape("llama_proj.weight", (48, 33)), r"wrong shapes.*llama_proj\.weight: \(48, 33\), expected \(48, 32\)"),
]


@pytest.mark.parametrize("edit,message", OFFICIAL_DAMAGE)
def test_official_checkpoint_problems_name_the_key_and_file(tmp_path, edit, message):
    files = write_official_set(tmp_path, stage=3)
    write_stage_checkpoint(tmp_path, stage=3, edit=edit)
    with pytest.raises(CheckpointError, match=message) as info:
        _plan(files)
    assert "TinyGPT-V_for_Stage3.pth" in str(info.value)


def test_partial_trained_qformer_is_an_error(tmp_path):
    files = write_official_set(tmp_path, stage=4, with_qformer=True)
    write_stage_checkpoint(tmp_path, stage=4, with_qformer=True,
                           edit=_delete("Qformer.bert.encoder.layer.1.output_query.dense.bias"))
    with pytest.raises(CheckpointError, match=r"Stage4\.pth: missing keys.*layer\.1\.output_query\.dense\.bias"):
        _plan(files)


@pytest.mark.parametrize("edit,message", [
    (_add("Qformer.bert.pooler.dense.weight"), r"unexpected keys.*Qformer\.bert\.pooler\.dense\.weight"),
    (_delete("Qformer.bert.encoder.layer.0.crossattention.self.key.weight"),
     r"missing keys.*layer\.0\.crossattention\.self\.key\.weight"),
    (_reshape("ln_vision.bias", (31,)), r"wrong shapes.*ln_vision\.bias: \(31,\)"),
])
def test_blip2_problems_name_the_key(tmp_path, edit, message):
    files = write_official_set(tmp_path, stage=3)
    write_blip2(tmp_path, edit=edit)
    with pytest.raises(CheckpointError, match=f"blip2_pretrained_flant5xxl.pth: {message}"):
        _plan(files)


@pytest.mark.parametrize("edit,message", [
    (_add("blocks.0.attn.relative_position_bias_table", (5, 2)),
     r"unexpected keys.*blocks\.0\.attn\.relative_position_bias_table"),
    (_delete("blocks.1.attn.v_bias"), r"missing keys.*blocks\.1\.attn\.v_bias"),
    (_reshape("blocks.1.mlp.fc2.weight", (32, 65)), r"wrong shapes.*blocks\.1\.mlp\.fc2\.weight"),
])
def test_eva_problems_name_the_key(tmp_path, edit, message):
    files = write_official_set(tmp_path, stage=3)
    write_eva(tmp_path, edit=edit)
    with pytest.raises(CheckpointError, match=f"eva_vit_g.pth: {message}"):
        _plan(files)


@pytest.mark.parametrize("layout,edit,message", [
    ("fused", _add("model.layers.0.mlp.fc3.weight"), r"unexpected keys.*model\.layers\.0\.mlp\.fc3\.weight"),
    ("split", _delete("model.layers.1.self_attn.k_proj.bias"), r"missing keys.*layers\.1\.self_attn\.k_proj\.bias"),
    ("fused", _delete("lm_head.bias"), r"missing keys.*lm_head\.bias"),
    ("split", _reshape("model.layers.0.self_attn.v_proj.weight", (64, 63)),
     r"wrong shapes.*layers\.0\.self_attn\.v_proj\.weight"),
])
def test_phi2_problems_name_the_key(tmp_path, layout, edit, message):
    files = write_official_set(tmp_path, stage=3)
    write_phi2(files.phi2, layout=layout, edit=edit)
    with pytest.raises(CheckpointError, match=message):
        _plan(files)


def test_null_bos_and_eos_in_phi2_config_fall_back_to_endoftext():
    """Some microsoft/phi-2 revisions write "bos_token_id": null and "eos_token_id": null."""
    from official_fixtures import phi2_config
    from tinygptv.checkpoint.phi2 import llm_config_from_phi2

    raw = {**phi2_config(TINY, layout="split"), "bos_token_id": None, "eos_token_id": None}
    cfg = llm_config_from_phi2(raw, "config.json")
    assert cfg.bos_token_id == cfg.eos_token_id == cfg.pad_token_id == LLMConfig().eos_token_id


def test_phi2_rotary_buffers_are_skipped_and_listed(tmp_path):
    phi = read_phi2(write_phi2(tmp_path / "phi", edit=_add("model.layers.0.self_attn.rotary_emb.inv_freq", (8,))))
    assert list(phi.report.skipped.values()) == [["model.layers.0.self_attn.rotary_emb.inv_freq"]]


def test_old_phi_msft_layout_is_explained(tmp_path):
    folder = write_phi2(tmp_path / "phi-msft", layout="msft")
    with pytest.raises(CheckpointError, match=r"old phi-msft.*mixer\.Wqkv.*query_key_value.*q_proj"):
        read_phi2(folder)


def test_dims_come_from_the_files(tmp_path):
    """A differently sized set converts with no size argument but the head counts: nothing is hard-coded."""
    dims = Dims(vit_width=24, vit_patch=4, vit_grid=3, vit_depth=3, vit_mlp=40, vit_heads=3, q_hidden=16,
                q_layers=4, q_queries=3, q_inter=24, q_heads=2, proj=20, hidden=32, layers=3, heads=2, inter=48,
                lora_r=4)
    files = write_official_set(tmp_path, dims, stage=3, layout="split", lora_default=True)
    out = convert_official(files.official, files.phi2, files.eva, files.blip2, tmp_path / "out", quiet=True,
                           vit_heads=3, qformer_heads=2)
    model = load_pretrained(out)
    cfg = model.config
    assert (cfg.vision.width, cfg.vision.patch_size, cfg.vision.depth, cfg.vision.mlp_dim,
            cfg.vision.pretrain_image_size) == (24, 4, 3, 40, 12)
    assert (cfg.qformer.hidden_size, cfg.qformer.num_layers, cfg.qformer.num_query_tokens,
            cfg.qformer.intermediate_size, cfg.qformer.cross_attention_frequency) == (16, 4, 3, 24, 2)
    assert cfg.projector.hidden_size == 20 and cfg.lora.r == 4
    official = torch.load(files.official, weights_only=True)["model"]
    embeds = torch.randn(1, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.llm(inputs_embeds=embeds).logits,
                                   reference_logits(phi2_weights(dims, layout="split"), official, dims, "split", 3,
                                                    embeds, dims.lora_alpha), atol=1e-5, rtol=1e-5)
        pixels = torch.randn(1, 3, 12, 12)
        torch.testing.assert_close(model.encode_image(pixels),
                                   reference_image_embeds(eva_weights(dims), blip2_weights(dims), official, dims, 12,
                                                          False, pixels), atol=1e-5, rtol=1e-5)


def test_head_counts_that_shapes_cannot_give_must_be_passed(tmp_path):
    files = write_official_set(tmp_path, stage=3)
    with pytest.raises(ValueError, match="vit_heads"):
        plan_official(files.official, files.phi2, files.eva, files.blip2, qformer_heads=2)
    with pytest.raises(ValueError, match="qformer_heads"):
        plan_official(files.official, files.phi2, files.eva, files.blip2, vit_heads=2)


# microsoft/phi-2's config.json (its published values).
PHI2_CONFIG = {
    "model_type": "phi", "vocab_size": 51200, "hidden_size": 2560, "intermediate_size": 10240,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "resid_pdrop": 0.1,
    "embd_pdrop": 0.0, "attention_dropout": 0.0, "hidden_act": "gelu_new", "max_position_embeddings": 2048,
    "layer_norm_eps": 1e-05, "rope_theta": 10000.0, "rope_scaling": None, "partial_rotary_factor": 0.4,
    "qk_layernorm": False, "tie_word_embeddings": False, "bos_token_id": 50256, "eos_token_id": 50256,
}


@pytest.mark.parametrize("stage,with_qformer,layout", [(1, False, "split"), (3, False, "fused"), (4, True, "split")])
def test_real_key_layout_converts_to_the_stage_presets(stage, with_qformer, layout):
    """The release's key names and sizes (shape-only meta tensors) convert, with no size or head-count
    argument, to exactly our stage preset, and the result fits the full-size model key for key."""
    container = ["optimizer", "scaler", "epoch"]
    official = LoadedFile("TinyGPT-V_for_Stage.pth", stage_weights(REAL, stage=stage, with_qformer=with_qformer,
                                                                    meta=True),
                          stage_run_config(REAL, stage=stage), container)
    phi = phi2_from_tensors(phi2_weights(REAL, layout=layout, meta=True), PHI2_CONFIG, "phi-2/model.safetensors")
    eva = LoadedFile("eva_vit_g.pth", eva_weights(REAL, meta=True), {}, [])
    blip2 = LoadedFile("blip2_pretrained_flant5xxl.pth", blip2_weights(REAL, meta=True), {}, ["optimizer"])
    plan = plan_loaded(official, phi, eva, blip2)
    assert phi.config == LLMConfig()
    assert plan.config == preset(f"tinygptv-stage{stage}")
    assert len([k for k in eva.weights if k.startswith("blocks.")]) == 40 * 13  # 40 blocks in, 39 kept
    with torch.device("meta"):
        model = TinyGPTV(plan.config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in align_lora_names(plan.state, expected).items()}
    assert got == expected


def test_refuses_to_replace_a_folder_that_is_not_a_model(tmp_path):
    files = write_official_set(tmp_path, stage=3)
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="notes.txt"):
        _convert(files, out)
    assert (out / "notes.txt").read_text() == "keep me"

