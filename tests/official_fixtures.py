# Tiny random files in the official layouts (LAVIS eva_vit_g.pth, blip2_pretrained_flant5xxl.pth, a Phi-2 folder,
# TinyGPT-V_for_StageN.pth): the inputs of official files -> convert -> our folder -> TinyGPTV.from_pretrained,
# small enough that the conversion tests run in seconds.
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from tinygptv.data.tokenizer import byte_level_tokenizer

Edit = Callable[[dict], None] | None  # lets a test damage the weights before they are written


@dataclass(frozen=True)
class Dims:
    """The sizes of the `tiny` preset. Head counts are the only dims a converter cannot read off the shapes."""

    vit_width: int = 32
    vit_patch: int = 7
    vit_grid: int = 4  # 28 px
    vit_depth: int = 2  # kept blocks; the EVA file holds one more, like eva_vit_g.pth's 40 for 39
    vit_mlp: int = 64
    vit_heads: int = 2
    q_hidden: int = 32
    q_layers: int = 2
    q_queries: int = 4
    q_inter: int = 64
    q_heads: int = 2
    q_cross_freq: int = 2
    proj: int = 48
    vocab: int = 320
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    inter: int = 128
    bos: int = 256
    eos: int = 256
    lora_r: int = 8
    lora_alpha: int = 2  # alpha / r = 0.25, as 16 / 64 in the release

    @property
    def image_size(self) -> int:
        return self.vit_grid * self.vit_patch


TINY = Dims()


# The release's sizes: with meta=True the builders give shape-only tensors, so the real key layout can be converted
# without the real files (and without memory).
REAL = Dims(vit_width=1408, vit_patch=14, vit_grid=16, vit_depth=39, vit_mlp=6144, vit_heads=16, q_hidden=768,
            q_layers=12, q_queries=32, q_inter=3072, q_heads=12, proj=4096, vocab=51200, hidden=2560, layers=32,
            heads=32, inter=10240, bos=50256, eos=50256, lora_r=64, lora_alpha=16)


class _Random:
    def __init__(self, seed: int, meta: bool = False):
        self.gen = torch.Generator().manual_seed(seed)
        self.meta = meta

    def __call__(self, *shape: int, scale: float = 0.2) -> torch.Tensor:
        if self.meta:
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=self.gen) * scale

    def norm_weight(self, width: int) -> torch.Tensor:
        return 1.0 + self(width, scale=0.1)


def _linear(out: dict, name: str, rnd: _Random, n_out: int, n_in: int, bias: bool = True) -> None:
    out[f"{name}.weight"] = rnd(n_out, n_in)
    if bias:
        out[f"{name}.bias"] = rnd(n_out, scale=0.05)


def _layer_norm(out: dict, name: str, rnd: _Random, width: int) -> None:
    out[f"{name}.weight"] = rnd.norm_weight(width)
    out[f"{name}.bias"] = rnd(width, scale=0.05)


def _save_pth(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


# --- EVA ViT (eva_vit_g.pth: a raw state dict) ----------------------------------------------------------------------


def eva_weights(dims: Dims = TINY, *, seed: int = 0, extra_heads: bool = False,
                meta: bool = False) -> dict[str, torch.Tensor]:
    rnd, w = _Random(seed, meta), dims.vit_width
    sd = {
        "cls_token": rnd(1, 1, w),
        "pos_embed": rnd(1, 1 + dims.vit_grid**2, w),
        "patch_embed.proj.weight": rnd(w, 3, dims.vit_patch, dims.vit_patch, scale=0.05),
        "patch_embed.proj.bias": rnd(w, scale=0.05),
    }
    for i in range(dims.vit_depth + 1):
        b = f"blocks.{i}."
        _layer_norm(sd, f"{b}norm1", rnd, w)
        sd[f"{b}attn.q_bias"] = rnd(w, scale=0.05)
        sd[f"{b}attn.v_bias"] = rnd(w, scale=0.05)
        sd[f"{b}attn.qkv.weight"] = rnd(3 * w, w)
        _linear(sd, f"{b}attn.proj", rnd, w, w)
        _layer_norm(sd, f"{b}norm2", rnd, w)
        _linear(sd, f"{b}mlp.fc1", rnd, dims.vit_mlp, w)
        _linear(sd, f"{b}mlp.fc2", rnd, w, dims.vit_mlp)
    if extra_heads:  # what a full EVA-CLIP visual state dict may add; BLIP-2 never uses them
        _layer_norm(sd, "norm", rnd, w)
        _linear(sd, "head", rnd, 16, w)
    return sd


def write_eva(folder, dims: Dims = TINY, *, seed: int = 0, under_model: bool = False, extra_heads: bool = False,
              edit: Edit = None) -> Path:
    sd = eva_weights(dims, seed=seed, extra_heads=extra_heads)
    if edit:
        edit(sd)
    return _save_pth({"model": sd} if under_model else sd, Path(folder) / "eva_vit_g.pth")


# --- BLIP-2 (blip2_pretrained_flant5xxl.pth: {"model": ...}) --------------------------------------------------------


def qformer_weights(dims: Dims = TINY, *, seed: int = 1, meta: bool = False) -> dict[str, torch.Tensor]:
    """The query path of a LAVIS Q-Former, plus query_tokens: what both the BLIP-2 file and the Dec-2023 stage-4
    checkpoint hold."""
    rnd, h = _Random(seed, meta), dims.q_hidden
    sd = {"query_tokens": rnd(1, dims.q_queries, h, scale=0.5)}
    _layer_norm(sd, "Qformer.bert.embeddings.LayerNorm", rnd, h)
    for i in range(dims.q_layers):
        p = f"Qformer.bert.encoder.layer.{i}."
        for proj in ("query", "key", "value"):
            _linear(sd, f"{p}attention.self.{proj}", rnd, h, h)
        _linear(sd, f"{p}attention.output.dense", rnd, h, h)
        _layer_norm(sd, f"{p}attention.output.LayerNorm", rnd, h)
        if i % dims.q_cross_freq == 0:
            _linear(sd, f"{p}crossattention.self.query", rnd, h, h)
            _linear(sd, f"{p}crossattention.self.key", rnd, h, dims.vit_width)
            _linear(sd, f"{p}crossattention.self.value", rnd, h, dims.vit_width)
            _linear(sd, f"{p}crossattention.output.dense", rnd, h, h)
            _layer_norm(sd, f"{p}crossattention.output.LayerNorm", rnd, h)
        _linear(sd, f"{p}intermediate_query.dense", rnd, dims.q_inter, h)
        _linear(sd, f"{p}output_query.dense", rnd, h, dims.q_inter)
        _layer_norm(sd, f"{p}output_query.LayerNorm", rnd, h)
    return sd


def position_ids() -> torch.Tensor:
    return torch.arange(512).unsqueeze(0)  # [1, 512] int64, the Q-Former's persistent buffer


def blip2_weights(dims: Dims = TINY, *, seed: int = 1, meta: bool = False) -> dict[str, torch.Tensor]:
    sd = qformer_weights(dims, seed=seed, meta=meta)
    rnd, h = _Random(seed + 100, meta), dims.q_hidden
    _layer_norm(sd, "ln_vision", rnd, dims.vit_width)
    # Everything BLIP-2's pre-training had that TinyGPT-V does not use.
    sd["Qformer.bert.embeddings.word_embeddings.weight"] = rnd(30, h)
    sd["Qformer.bert.embeddings.position_embeddings.weight"] = rnd(512, h)
    sd["Qformer.bert.embeddings.position_ids"] = position_ids()
    for i in range(dims.q_layers):
        p = f"Qformer.bert.encoder.layer.{i}."
        _linear(sd, f"{p}intermediate.dense", rnd, dims.q_inter, h)
        _linear(sd, f"{p}output.dense", rnd, h, dims.q_inter)
        _layer_norm(sd, f"{p}output.LayerNorm", rnd, h)
    _linear(sd, "Qformer.cls.predictions.transform.dense", rnd, h, h)
    _layer_norm(sd, "Qformer.cls.predictions.transform.LayerNorm", rnd, h)
    _linear(sd, "Qformer.cls.predictions.decoder", rnd, 30, h)
    sd["Qformer.cls.predictions.bias"] = rnd(30)
    _linear(sd, "t5_proj", rnd, 24, h)
    sd["t5_model.shared.weight"] = rnd(30, 24)
    sd["visual_encoder.cls_token"] = rnd(1, 1, dims.vit_width)
    _linear(sd, "vision_proj", rnd, 16, h)
    _linear(sd, "text_proj", rnd, 16, h)
    _linear(sd, "itm_head", rnd, 2, h)
    sd["temp"] = torch.tensor(0.07)
    return sd


def write_blip2(folder, dims: Dims = TINY, *, seed: int = 1, edit: Edit = None) -> Path:
    sd = blip2_weights(dims, seed=seed)
    if edit:
        edit(sd)
    return _save_pth({"model": sd}, Path(folder) / "blip2_pretrained_flant5xxl.pth")


# --- Phi-2 folder ---------------------------------------------------------------------------------------------------


def phi2_weights(dims: Dims = TINY, *, layout: str = "fused", seed: int = 2,
                 meta: bool = False) -> dict[str, torch.Tensor]:
    """layout "fused": transformers-4.36 query_key_value; "split": today's q_proj/k_proj/v_proj; "msft": the old
    phi-msft remote-code names (only enough of them to be recognised)."""
    rnd, d = _Random(seed, meta), dims.hidden
    if layout == "msft":
        return {"transformer.embd.wte.weight": rnd(dims.vocab, d),
                "transformer.h.0.mixer.Wqkv.weight": rnd(3 * d, d), "lm_head.linear.weight": rnd(dims.vocab, d)}
    sd = {"model.embed_tokens.weight": rnd(dims.vocab, d, scale=1.0)}
    for i in range(dims.layers):
        p = f"model.layers.{i}."
        _layer_norm(sd, f"{p}input_layernorm", rnd, d)
        if layout == "fused":
            _linear(sd, f"{p}self_attn.query_key_value", rnd, 3 * d, d)
        elif layout == "split":
            for proj in ("q_proj", "k_proj", "v_proj"):
                _linear(sd, f"{p}self_attn.{proj}", rnd, d, d)
        else:
            raise ValueError(layout)
        _linear(sd, f"{p}self_attn.dense", rnd, d, d)
        _linear(sd, f"{p}mlp.fc1", rnd, dims.inter, d)
        _linear(sd, f"{p}mlp.fc2", rnd, d, dims.inter)
    _layer_norm(sd, "model.final_layernorm", rnd, d)
    _linear(sd, "lm_head", rnd, dims.vocab, d)
    return sd


# Rotary settings differ between the two layouts' configs, so a test sees that they are read, not assumed.
ROPE = {"fused": (10000.0, 0.5), "split": (500.0, 0.25), "msft": (10000.0, 0.4)}


def phi2_config(dims: Dims = TINY, *, layout: str = "fused") -> dict:
    theta, partial = ROPE[layout]
    if layout == "msft":
        return {"model_type": "phi-msft", "n_embd": dims.hidden, "n_layer": 1, "n_head": dims.heads,
                "vocab_size": dims.vocab}
    cfg = {
        "architectures": ["PhiForCausalLM"], "model_type": "phi", "vocab_size": dims.vocab,
        "hidden_size": dims.hidden, "intermediate_size": dims.inter, "num_hidden_layers": dims.layers,
        "num_attention_heads": dims.heads, "num_key_value_heads": dims.heads, "resid_pdrop": 0.1,
        "embd_pdrop": 0.0, "attention_dropout": 0.0, "hidden_act": "gelu_new", "max_position_embeddings": 512,
        "layer_norm_eps": 1e-5, "qk_layernorm": False, "tie_word_embeddings": False,
        "bos_token_id": dims.bos, "eos_token_id": dims.eos,
    }
    if layout == "fused":  # 4.36: rope settings at the top level
        cfg.update(rope_theta=theta, partial_rotary_factor=partial, rope_scaling=None)
    else:  # transformers 5: grouped under rope_parameters
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": partial}
    return cfg


def write_phi2(folder, dims: Dims = TINY, *, layout: str = "fused", fmt: str = "safetensors", shards: int = 1,
               seed: int = 2, edit: Edit = None) -> Path:
    """fmt "safetensors" or "bin"; shards > 1 writes model-0000X-of-0000Y files and the index."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = phi2_weights(dims, layout=layout, seed=seed)
    if edit:
        edit(sd)
    (folder / "config.json").write_text(json.dumps(phi2_config(dims, layout=layout), indent=2))
    byte_level_tokenizer().save_pretrained(folder)
    _write_weights(folder, sd, fmt, shards)
    return folder


def _write_weights(folder: Path, sd: dict, fmt: str, shards: int) -> None:
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"

    def save(part: dict, name: str) -> None:
        if fmt == "safetensors":
            save_file({k: v.contiguous() for k, v in part.items()}, folder / name, metadata={"format": "pt"})
        else:
            torch.save(part, folder / name)

    if shards == 1:
        save(sd, f"{stem}.{ext}")
        return
    keys = list(sd)
    weight_map = {}
    for s in range(shards):
        name = f"{stem}-{s + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: sd[k] for k in keys[s::shards]}
        save(part, name)
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))


# --- TinyGPT-V stage checkpoint ({"model", "optimizer", "config", "scaler", "epoch"}) ------------------------------


def llm_prefix(stage: int) -> str:
    return "llama_model.model." if stage == 1 else "llama_model.base_model.model.model."


def stage_weights(dims: Dims = TINY, *, stage: int, lora_default: bool = False, with_qformer: bool = False,
                  seed: int = 3, meta: bool = False) -> dict[str, torch.Tensor]:
    """Only what trains is saved in the release: projections, norm weights, LoRA from stage 2 on, and for the
    Dec-2023 stage-4 file the whole Q-Former; plus the Q-Former's position_ids buffer."""
    rnd, d, dh = _Random(seed, meta), dims.hidden, dims.hidden // dims.heads
    sd: dict[str, torch.Tensor] = {}
    _linear(sd, "llama_proj", rnd, dims.proj, dims.q_hidden)
    _linear(sd, "llama_proj2", rnd, dims.hidden, dims.proj)
    prefix = llm_prefix(stage)
    lora = ".default.weight" if lora_default else ".weight"
    for i in range(dims.layers):
        p = f"{prefix}layers.{i}."
        if stage > 1:
            for target, n_out in (("query_key_value", 3 * d), ("dense", d)):
                sd[f"{p}self_attn.{target}.lora_A{lora}"] = rnd(dims.lora_r, d)
                sd[f"{p}self_attn.{target}.lora_B{lora}"] = rnd(n_out, dims.lora_r)  # trained: non-zero
        sd[f"{p}self_attn.q_layernorm.weight"] = rnd.norm_weight(dh)
        sd[f"{p}self_attn.k_layernorm.weight"] = rnd.norm_weight(dh)
        sd[f"{p}input_layernorm.weight"] = rnd.norm_weight(d)
        sd[f"{p}post_layernorm.weight"] = rnd.norm_weight(d)
    sd[f"{prefix}final_layernorm.weight"] = rnd.norm_weight(d)
    if with_qformer:
        sd.update(qformer_weights(dims, seed=seed + 50, meta=meta))  # differs from BLIP-2's, so the override is visible
    sd["Qformer.bert.embeddings.position_ids"] = position_ids()
    return sd


def stage_run_config(dims: Dims = TINY, *, stage: int) -> dict:
    """The part of the LAVIS run config a converter may read (model.image_size / lora_alpha, data sets)."""
    size = dims.image_size * (2 if stage == 4 else 1)  # 224 / 448 in the release
    dataset = {1: "laion", 2: "laion", 3: "cc_sbu_align", 4: "refcoco"}[stage]
    return {
        "model": {"arch": "minigpt_v2" if stage == 4 else "minigpt4", "image_size": size,
                  "lora_r": 0 if stage == 1 else dims.lora_r, "lora_alpha": dims.lora_alpha},
        "datasets": {dataset: {"vis_processor": {"train": {"name": "blip2_image_train", "image_size": size}}}},
        "run": {"task": "image_text_pretrain", "init_lr": 1e-4},
    }


def write_stage_checkpoint(folder, dims: Dims = TINY, *, stage: int, lora_default: bool = False,
                           with_qformer: bool = False, with_config: bool = True, raw: bool = False, seed: int = 3,
                           edit: Edit = None) -> Path:
    """raw=True writes the bare state dict instead of the LAVIS container."""
    sd = stage_weights(dims, stage=stage, lora_default=lora_default, with_qformer=with_qformer, seed=seed)
    if edit:
        edit(sd)
    path = Path(folder) / f"TinyGPT-V_for_Stage{stage}.pth"
    if raw:
        return _save_pth(sd, path)
    first = next(iter(sd.values()))
    optimizer = {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros_like(first),
                               "exp_avg_sq": torch.zeros_like(first)}},
                 "param_groups": [{"lr": 1e-4, "weight_decay": 0.05, "params": [0]}]}
    container = {"model": sd, "optimizer": optimizer, "config": stage_run_config(dims, stage=stage) if with_config
                 else {}, "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 3}, "epoch": 0}
    return _save_pth(container, path)


@dataclass
class OfficialFiles:
    official: Path
    phi2: Path
    eva: Path
    blip2: Path


def write_official_set(folder, dims: Dims = TINY, *, stage: int, layout: str = "fused", lora_default: bool = False,
                       with_qformer: bool = False, fmt: str = "safetensors", shards: int = 1,
                       with_config: bool = True) -> OfficialFiles:
    folder = Path(folder)
    return OfficialFiles(
        official=write_stage_checkpoint(folder, dims, stage=stage, lora_default=lora_default,
                                        with_qformer=with_qformer, with_config=with_config),
        phi2=write_phi2(folder / "phi-2", dims, layout=layout, fmt=fmt, shards=shards),
        eva=write_eva(folder, dims),
        blip2=write_blip2(folder, dims),
    )
