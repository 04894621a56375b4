# A training stage as data: the recipe file (YAML) names the model to start from, the datasets and their sample
# ratios, the prompt settings, the schedule and which components train. `tinygptv train RECIPE key=value ...`.
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tinygptv.config import _build
from tinygptv.data.templates import IMAGE_PROMPT

TUNE_CHOICES = {
    "vision": ("frozen", "full"),
    # "cross_attention": only what a Q-Former started from a text BERT lacks (cross-attention, queries, ln_vision).
    "qformer": ("frozen", "cross_attention", "full"),
    "projector": ("frozen", "full"),
    # "norms": TinyGPT-V's trainable norm weights only (stage 1); "lora+norms": stages 2-4.
    "llm": ("frozen", "norms", "lora", "lora+norms", "full"),
}


@dataclass
class ModelSource:
    preset: str | None = None  # build this preset (random weights, or real backbones for "nano" with backbones=True)
    init_from: str | None = None  # then load the weights of this checkpoint folder (an earlier stage's output)
    backbones: bool = False  # fill the frozen parts from the registered pretrained backbones
    # Overrides of the preset's config, e.g. {"lora": {"r": 64}, "vision": {"image_size": 448}}
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetEntry:
    name: str  # key in tinygptv.data.datasets.DATASETS
    batch_size: int = 1
    sample_ratio: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)  # passed to the dataset builder (paths, split...)


@dataclass
class Schedule:
    """LAVIS's linear_warmup_cosine_lr: warm-up from warmup_lr to init_lr over warmup_steps (global steps), then a
    cosine from init_lr to min_lr over all max_epoch * iters_per_epoch steps, computed from step 0."""

    init_lr: float = 1e-4
    min_lr: float = 8e-5
    warmup_lr: float = 1e-6
    warmup_steps: int = 1000
    max_epoch: int = 1
    iters_per_epoch: int = 5000
    weight_decay: float = 0.05


@dataclass
class Tune:
    vision: str = "frozen"
    qformer: str = "frozen"
    projector: str = "full"
    llm: str = "lora+norms"
    lr_scale: dict[str, float] = field(default_factory=dict)  # per component, multiplies the schedule's lr


@dataclass
class Recipe:
    model: ModelSource = field(default_factory=ModelSource)
    datasets: list[DatasetEntry] = field(default_factory=list)
    schedule: Schedule = field(default_factory=Schedule)
    tune: Tune = field(default_factory=Tune)
    # Prompt settings override the model config's (template, end_sym, max_txt_len); None keeps the model's.
    template: str | None = None
    end_sym: str | None = None
    max_txt_len: int | None = None
    image_size: int | None = None
    # How an image instruction is written before the template wraps it, and what follows every instruction that has
    # an image or is a follow-up question (the official stage-4 readers add a space: instruction_suffix " ").
    image_prompt: str = IMAGE_PROMPT
    instruction_suffix: str = ""
    # Text between an answer and the next question of a multi-turn sample; None = the tokenizer's EOS text, as the
    # official code does (<|endoftext|> for Phi-2). ChatML recipes use "" (end_sym already closes the turn).
    turn_separator: str | None = None
    accum_grad_steps: int = 1
    grad_clip: float | None = None  # the official recipe does not clip
    gradient_checkpointing: bool = False
    # Keep the frozen vision tower's output per image file in memory (bf16) and reuse it: on a CPU the tower can cost
    # more than the step. Only applies while tune.vision is frozen.
    cache_vision_features: bool = False
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (fp16 only on CUDA, with a grad scaler)
    seed: int = 42
    output_dir: str = "runs/train"
    save_every: int = 0  # steps between checkpoints; 0 = at the end of every epoch
    keep_checkpoints: int = 2
    on_bad_record: str = "stop"  # stop | skip
    num_workers: int = 0
    log_every: int = 10
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "tinygptv"
    distributed: str = "ddp"  # ddp | fsdp (when launched by torchrun)
    notes: str = ""  # free text: why this recipe differs from the official one

    def validate(self) -> "Recipe":
        for comp, choices in TUNE_CHOICES.items():
            value = getattr(self.tune, comp)
            if value not in choices:
                raise ValueError(f"tune.{comp}: {value!r} is not one of {', '.join(choices)}")
        if not self.datasets:
            raise ValueError("the recipe names no datasets")
        for i, d in enumerate(self.datasets):
            if d.batch_size < 1 or d.sample_ratio <= 0:
                raise ValueError(f"datasets[{i}] ({d.name}): batch_size must be >= 1 and sample_ratio > 0")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision: {self.precision!r} is not one of auto, fp32, bf16, fp16")
        if self.on_bad_record not in ("stop", "skip"):
            raise ValueError(f"on_bad_record: {self.on_bad_record!r} is not 'stop' or 'skip'")
        if self.model.preset is None and self.model.init_from is None:
            raise ValueError("model: give a preset, an init_from checkpoint, or both")
        return self

    @property
    def total_steps(self) -> int:
        return self.schedule.max_epoch * self.schedule.iters_per_epoch


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    for item in overrides or []:
        apply_override(data, item)
    data["datasets"] = [_build(DatasetEntry, d, f"{path}: datasets[{i}]") for i, d in enumerate(data.get("datasets", []))]
    datasets = data.pop("datasets")
    recipe = _build(Recipe, data, str(path))
    recipe.datasets = datasets
    return recipe.validate()


def apply_override(data: dict, item: str) -> None:
    """`schedule.init_lr=3e-5` or `datasets.0.batch_size=2`: the value is parsed as YAML (numbers, booleans, null)."""
    if "=" not in item:
        raise ValueError(f"override {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    node: Any = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    last = parts[-1]
    value = yaml.safe_load(raw)
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def recipe_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)
