# Reader for a Phi-2 folder (config.json + safetensors or .bin weights, one file or sharded), the source of every
# frozen LLM weight in a converted model. Data path: official files -> [phi2.py, official.py] -> our folder ->
# TinyGPTV.from_pretrained. Also holds the key ledger both readers use to prove every tensor was accounted for.
from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from safetensors.torch import load_file

from tinygptv.checkpoint.native import CheckpointError
from tinygptv.config import LLMConfig

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json",
)
LAYOUT_FUSED = "fused query_key_value (transformers 4.36)"
LAYOUT_SPLIT = "separate q_proj/k_proj/v_proj (transformers >= 4.37, today's microsoft/phi-2)"


# --- bookkeeping shared with official.py ----------------------------------------------------------------------------


@dataclass
class FileReport:
    """What happened to each tensor of one input file: the summary a user reads to trust a conversion."""

    role: str  # "Phi-2", "EVA ViT", "BLIP-2", "TinyGPT-V checkpoint"
    path: str
    consumed: list[str] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # rule -> source keys
    ignored_entries: list[str] = field(default_factory=list)  # non-weight entries of the container (optimizer, ...)

    def summary(self) -> str:
        lines = [f"{self.role}: {self.path}", f"  consumed {len(self.consumed)} tensors"]
        for rule, keys in self.skipped.items():
            lines.append(f"  skipped {len(keys)} ({rule})")
        if self.ignored_entries:
            lines.append(f"  ignored container entries: {', '.join(self.ignored_entries)}")
        return "\n".join(lines)


class TensorLedger:
    """One input file's tensors. Each key must end up taken (with its shape checked) or skipped under a named rule;
    `finish` raises one CheckpointError listing every missing, unexpected and mis-shaped key, so nothing is dropped
    silently the way the official strict=False loading did."""

    def __init__(self, role: str, path: str | Path, tensors: Mapping[str, torch.Tensor]):
        self.role = role
        self.path = str(path)
        self.tensors = dict(tensors)
        self.report = FileReport(role, self.path)
        self._done: set[str] = set()
        self.missing: list[str] = []
        self.wrong_shapes: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def peek(self, key: str) -> torch.Tensor | None:
        """Look without consuming: used to infer dimensions."""
        return self.tensors.get(key)

    def take(self, key: str, shape: Iterable[int] | None = None) -> torch.Tensor | None:
        if key not in self.tensors:
            self.missing.append(key)
            return None
        tensor = self.tensors[key]
        if key not in self._done:
            self._done.add(key)
            self.report.consumed.append(key)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            self.wrong_shapes.append(f"{key}: {tuple(tensor.shape)}, expected {tuple(shape)}")
        return tensor

    def skip(self, rule: str, matches: Callable[[str], bool]) -> list[str]:
        keys = [k for k in self.tensors if k not in self._done and matches(k)]
        for key in keys:
            self._done.add(key)
        if keys:
            self.report.skipped.setdefault(rule, []).extend(keys)
        return keys

    def fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.role} file {self.path}: {message}")

    def finish(self) -> FileReport:
        unexpected = [k for k in self.tensors if k not in self._done]
        problems = []
        if self.missing:
            problems.append(f"missing keys ({len(self.missing)}): {preview(self.missing)}")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {preview(unexpected)}")
        if self.wrong_shapes:
            problems.append(f"wrong shapes ({len(self.wrong_shapes)}): {preview(self.wrong_shapes)}")
        if problems:
            raise self.fail("; ".join(problems))
        return self.report


def preview(keys: list[str], n: int = 12) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... and {len(keys) - n} more" if len(keys) > n else "")


def vote(values: Iterable[int], what: str, ledger: TensorLedger) -> int:
    """The most common value: one corrupt tensor must not redefine a dimension, it must be the one reported."""
    counts = Counter(values)
    if not counts:
        raise ledger.fail(f"cannot infer {what}: no tensor to infer it from")
    return counts.most_common(1)[0][0]


def layer_indices(keys: Iterable[str], pattern: str) -> list[int]:
    """Sorted indices N of keys matching `pattern` (a regex with one group for N)."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := regex.match(k))})


def require_contiguous(indices: list[int], what: str, ledger: TensorLedger) -> int:
    if indices != list(range(len(indices))):
        raise ledger.fail(f"{what} indices are not 0..N-1 without gaps: {indices}")
    return len(indices)


# --- reading a Phi-2 folder -----------------------------------------------------------------------------------------


@dataclass
class Phi2Checkpoint:
    folder: Path
    layout: str
    config: LLMConfig
    state: dict[str, torch.Tensor]  # our key names ("llm.model...."), without LoRA's ".base_layer."
    report: FileReport
    notes: list[str]


def read_phi2(folder: str | Path) -> Phi2Checkpoint:
    """Phi-2 weights in our key names plus the LLMConfig they imply. The fused (head, q/k/v, head_dim) QKV of the
    4.36 layout is what TinyGPT-V's LoRA was trained against, so today's split projections are fused into it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"Phi-2 folder {folder}: not a directory")
    raw_config = _read_config(folder)
    tensors, where = load_weights(folder)
    return phi2_from_tensors(tensors, raw_config, where, folder)


def phi2_from_tensors(tensors: Mapping[str, torch.Tensor], raw_config: dict, where: str,
                      folder: Path | None = None) -> Phi2Checkpoint:
    """The same conversion from tensors already in memory (meta tensors work: shapes are all it needs)."""
    folder = Path(folder) if folder is not None else Path(where).parent
    ledger = TensorLedger("Phi-2", where, tensors)
    _reject_phi_msft(ledger, raw_config)
    notes: list[str] = []
    config = llm_config_from_phi2(raw_config, str(folder / "config.json"), notes)
    layout = _detect_layout(ledger)
    _check_config_against_tensors(config, ledger)
    state = _convert_tensors(ledger, config, layout)
    ledger.skip("rotary inv_freq buffers (recomputed from the config)", lambda k: k.endswith("rotary_emb.inv_freq"))
    report = ledger.finish()
    return Phi2Checkpoint(folder, layout, config, state, report, notes)


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"Phi-2 folder {folder}: no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def load_weights(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Every tensor of a transformers weights folder: safetensors preferred, .bin only through weights_only=True."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            return _load_shards(folder, index), str(index)
        if (folder / single).is_file():
            return _load_one(folder / single), str(folder / single)
    raise CheckpointError(
        f"Phi-2 folder {folder}: no weights found (expected model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json)"
    )


def _load_shards(folder: Path, index: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index}: not a weights index with a 'weight_map' ({e})") from None
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        path = folder / shard
        if not path.is_file():
            raise CheckpointError(f"{index}: lists shard {shard}, which is not in the folder")
        for key, value in _load_one(path).items():
            if key in tensors:
                raise CheckpointError(f"{path}: key {key} appears in more than one shard")
            tensors[key] = value
    listed = set(weight_map)
    if listed != set(tensors):
        absent = sorted(listed - set(tensors))
        if absent:
            raise CheckpointError(f"{index}: lists keys that no shard holds: {preview(absent)}")
    return tensors


def _load_one(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused (not plain tensors) or a corrupt file
        raise CheckpointError(f"{path}: cannot be read as a plain state dict with weights_only=True ({e})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return obj


def _reject_phi_msft(ledger: TensorLedger, raw_config: dict) -> None:
    msft_keys = [k for k in ledger.keys() if ".mixer.Wqkv." in k or k.startswith("transformer.")]
    if msft_keys or raw_config.get("model_type") == "phi-msft":
        wqkv = [k for k in msft_keys if ".mixer.Wqkv." in k]
        example = (wqkv or msft_keys or ["model_type 'phi-msft' in config.json"])[0]
        raise ledger.fail(
            f"this is the old phi-msft remote-code layout (transformer.h.N.mixer.Wqkv; found {example}). "
            "TinyGPT-V needs Phi-2 in the transformers layout: either the transformers-4.36 conversion with a fused "
            "model.layers.N.self_attn.query_key_value (e.g. susnato/phi-2), or today's microsoft/phi-2 with "
            "model.layers.N.self_attn.q_proj/k_proj/v_proj. Download a current revision of microsoft/phi-2."
        )


def llm_config_from_phi2(raw: dict, source: str, notes: list[str] | None = None) -> LLMConfig:
    """LLMConfig from a transformers Phi config.json (4.36 or today's, whose rope settings may sit in
    rope_parameters). pad = eos, as TinyGPT-V pads with <|endoftext|>."""
    notes = notes if notes is not None else []

    def need(name: str):
        if name not in raw:
            raise CheckpointError(f"{source}: no '{name}'")
        return raw[name]

    rope = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if scaling or rope_type != "default":
        raise CheckpointError(f"{source}: rope scaling {scaling or rope_type!r} is not supported (TinyGPT-V's Phi-2 "
                              "uses plain RoPE)")
    heads = need("num_attention_heads")
    kv_heads = raw.get("num_key_value_heads") or heads
    if kv_heads != heads:
        raise CheckpointError(f"{source}: num_key_value_heads {kv_heads} != num_attention_heads {heads}; the fused "
                              "QKV of TinyGPT-V needs plain multi-head attention")
    defaults = LLMConfig()
    eos = raw.get("eos_token_id")
    if eos is None:
        eos = defaults.eos_token_id
        notes.append(f"{source}: no eos_token_id, using {eos}")
    bos = raw.get("bos_token_id")
    bos = eos if bos is None else bos  # absent, or null as in some microsoft/phi-2 revisions
    return LLMConfig(
        name="phi",
        vocab_size=need("vocab_size"),
        hidden_size=need("hidden_size"),
        num_layers=need("num_hidden_layers"),
        num_heads=heads,
        intermediate_size=need("intermediate_size"),
        max_position_embeddings=raw.get("max_position_embeddings", defaults.max_position_embeddings),
        rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", defaults.rope_theta))),
        partial_rotary_factor=float(rope.get("partial_rotary_factor",
                                             raw.get("partial_rotary_factor", defaults.partial_rotary_factor))),
        layer_norm_eps=float(raw.get("layer_norm_eps", defaults.layer_norm_eps)),
        hidden_act=raw.get("hidden_act", defaults.hidden_act),
        resid_pdrop=float(raw.get("resid_pdrop", defaults.resid_pdrop)),
        embd_pdrop=float(raw.get("embd_pdrop", defaults.embd_pdrop)),
        attention_dropout=float(raw.get("attention_dropout", defaults.attention_dropout)),
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )


def _detect_layout(ledger: TensorLedger) -> str:
    fused = any(".self_attn.query_key_value." in k for k in ledger.keys())
    split = any(".self_attn.q_proj." in k for k in ledger.keys())
    if fused and split:
        raise ledger.fail("holds both a fused query_key_value and separate q_proj weights; expected one layout")
    if not fused and not split:
        raise ledger.fail("no attention projections found (neither model.layers.N.self_attn.query_key_value nor "
                          "model.layers.N.self_attn.q_proj)")
    return LAYOUT_FUSED if fused else LAYOUT_SPLIT


def _check_config_against_tensors(cfg: LLMConfig, ledger: TensorLedger) -> None:
    """config.json and the tensors must agree before anything is renamed, so a mismatched pair fails here."""
    layers = require_contiguous(layer_indices(ledger.keys(), r"^model\.layers\.(\d+)\."), "model.layers", ledger)
    if layers != cfg.num_layers:
        raise ledger.fail(f"holds {layers} layers but config.json says num_hidden_layers={cfg.num_layers}")
    if cfg.hidden_size % cfg.num_heads:
        raise ledger.fail(f"hidden_size {cfg.hidden_size} is not divisible by num_attention_heads {cfg.num_heads}")
    embed = ledger.peek("model.embed_tokens.weight")
    if embed is not None and tuple(embed.shape) != (cfg.vocab_size, cfg.hidden_size):
        raise ledger.fail(f"model.embed_tokens.weight is {tuple(embed.shape)}, config.json implies "
                          f"({cfg.vocab_size}, {cfg.hidden_size})")
    fc1 = ledger.peek("model.layers.0.mlp.fc1.weight")
    if fc1 is not None and tuple(fc1.shape) != (cfg.intermediate_size, cfg.hidden_size):
        raise ledger.fail(f"model.layers.0.mlp.fc1.weight is {tuple(fc1.shape)}, config.json implies "
                          f"({cfg.intermediate_size}, {cfg.hidden_size})")


def _convert_tensors(ledger: TensorLedger, cfg: LLMConfig, layout: str) -> dict[str, torch.Tensor]:
    d, inter, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    head_dim = d // cfg.num_heads
    state: dict[str, torch.Tensor] = {}

    def copy(src: str, shape: tuple[int, ...], dst: str | None = None) -> None:
        tensor = ledger.take(src, shape)
        if tensor is not None:
            state["llm." + (dst or src)] = tensor

    copy("model.embed_tokens.weight", (vocab, d))
    for name in ("weight", "bias"):
        copy(f"model.final_layernorm.{name}", (d,))
    copy("lm_head.weight", (vocab, d))
    copy("lm_head.bias", (vocab,))
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        for name in ("weight", "bias"):
            copy(f"{p}input_layernorm.{name}", (d,))
            copy(f"{p}self_attn.dense.{name}", (d, d) if name == "weight" else (d,))
            copy(f"{p}mlp.fc1.{name}", (inter, d) if name == "weight" else (inter,))
            copy(f"{p}mlp.fc2.{name}", (d, inter) if name == "weight" else (d,))
            # Stock Phi's optional qk_layernorm: if the folder has it, it is the starting value, as in the official
            # from_pretrained; otherwise the converter starts these at weight 1 / bias 0.
            for norm in ("q_layernorm", "k_layernorm"):
                if f"{p}self_attn.{norm}.{name}" in ledger:
                    copy(f"{p}self_attn.{norm}.{name}", (head_dim,))
        if layout == LAYOUT_FUSED:
            copy(f"{p}self_attn.query_key_value.weight", (3 * d, d))
            copy(f"{p}self_attn.query_key_value.bias", (3 * d,))
        else:
            _fuse_layer(ledger, state, p, cfg.num_heads, d)
    return state


def _fuse_layer(ledger: TensorLedger, state: dict, prefix: str, heads: int, d: int) -> None:
    for name, shape in (("weight", (d, d)), ("bias", (d,))):
        parts = [ledger.take(f"{prefix}self_attn.{proj}.{name}", shape) for proj in ("q_proj", "k_proj", "v_proj")]
        if any(t is None or tuple(t.shape) != shape for t in parts):
            continue  # already recorded as missing / wrong shape
        state[f"llm.{prefix}self_attn.query_key_value.{name}"] = fuse_qkv(*parts, heads)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Separate projections -> the 4.36 fused layout whose rows are ordered (head, q/k/v, head_dim)."""
    d = q.shape[0]
    stacked = torch.stack((q, k, v))  # [3, D, ...] (weights [3, D, D_in], biases [3, D])
    stacked = stacked.reshape(3, heads, d // heads, *q.shape[1:])  # [3, H, Dh, ...]
    stacked = stacked.transpose(0, 1)  # [H, 3, Dh, ...]
    return stacked.reshape(3 * d, *q.shape[1:]).contiguous()  # [3D, ...]


def tokenizer_files(folder: str | Path) -> list[str]:
    """Names of the tokenizer files present; checked before any heavy work so a folder without them fails early."""
    folder = Path(folder)
    found = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not found:
        raise CheckpointError(f"Phi-2 folder {folder}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")
    return found


def copy_tokenizer_files(folder: str | Path, out: str | Path) -> list[str]:
    """Copied byte for byte (not re-saved), so the converted model tokenizes exactly as the Phi-2 folder does."""
    names = tokenizer_files(folder)
    for name in names:
        shutil.copyfile(Path(folder) / name, Path(out) / name)
    return names
