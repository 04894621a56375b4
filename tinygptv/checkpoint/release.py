# The official TinyGPT-V release as data: for each stage, every source file `tinygptv fetch` downloads (where from,
# at which pinned revision, its size and sha256 when known, its licence), and where the converted model lives.
# Data path: this table -> fetch.py (download, verify) -> official.py (convert) -> cache_dir()/models/<name>.
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tinygptv.config import CONFIG_NAME, PRESETS, cache_dir
from tinygptv.registry import Registry

HF = "hf"  # a file in a Hugging Face Hub repository, fetched through huggingface_hub at a pinned revision
URL = "url"  # a plain HTTPS file, fetched by tinygptv.checkpoint.download (resumable)

# What each file is to the converter (the arguments of convert_official).
CHECKPOINT, PHI2, EVA, BLIP2 = "checkpoint", "phi2", "eva", "blip2"


@dataclass(frozen=True)
class SourceFile:
    """One file a stage needs. `size` and `sha256` are checked whenever they are recorded (each from a public record
    of the file itself, named in the comments beside it); an entry with both is verified. An unverified entry is
    checked for what it has, and fetch prints the sha256 it saw so the entry can be completed. `approx_bytes` only
    sizes the download estimate when `size` is unknown."""

    role: str
    filename: str
    kind: str
    licence: str
    repo_id: str | None = None
    revision: str | None = None
    url: str | None = None
    size: int | None = None
    sha256: str | None = None
    approx_bytes: int | None = None
    optional: bool = False  # a small file the converter can do without (skipped when the revision lacks it)

    @property
    def verified(self) -> bool:
        return self.size is not None and self.sha256 is not None

    @property
    def expected_bytes(self) -> int:
        return self.size or self.approx_bytes or 0

    @property
    def source(self) -> str:
        if self.kind == HF:
            return f"hf://{self.repo_id}@{self.revision}/{self.filename}"
        return str(self.url)

    @property
    def web_url(self) -> str:
        """Where a browser or curl gets the file (the manual route); the Hub's own endpoint for Hub files."""
        if self.kind == HF:
            return f"https://huggingface.co/{self.repo_id}/resolve/{self.revision}/{self.filename}"
        return str(self.url)


# --- TinyGPT-V's own checkpoints --------------------------------------------------------------------------------
# Repository: https://github.com/DLYuanGod/TinyGPT-V/blob/main/README.md ("Prepare the pretrained model checkpoints")
# links https://huggingface.co/Tyrannosaurus/TinyGPT-V/blob/main/TinyGPT-V_for_StageN.pth for N = 1..4.
# Revision 558d3ad: the commit of Jan 19 2024 that uploaded the current TinyGPT-V_for_Stage4.pth, as read from
# https://huggingface.co/Tyrannosaurus/TinyGPT-V/commits/main; only this abbreviation is on record (the Hub resolves
# abbreviated commits; fetch prints the full one). Earlier commits hold other stage-4 files: 5444543 (Dec 28 2023,
# 1,805,910,138 bytes, with a trained Q-Former) and 26f31ac (23,711,618 bytes). Sizes: the LFS sizes on the same
# commit pages. No public record of their sha256 was found: unverified.
TINYGPTV_REPO = "Tyrannosaurus/TinyGPT-V"
TINYGPTV_REVISION = "558d3ad"
TINYGPTV_LICENCE = "BSD-3-Clause"  # LICENSE.md of github.com/DLYuanGod/TinyGPT-V
STAGE_SIZES = {1: 165_963_356, 2: 543_639_991, 3: 543_640_119, 4: 543_654_414}


def stage_checkpoint(stage: int) -> SourceFile:
    return SourceFile(CHECKPOINT, f"TinyGPT-V_for_Stage{stage}.pth", HF, TINYGPTV_LICENCE, repo_id=TINYGPTV_REPO,
                      revision=TINYGPTV_REVISION, size=STAGE_SIZES[stage])


# --- Phi-2 ------------------------------------------------------------------------------------------------------
# https://huggingface.co/microsoft/phi-2: the transformers layout (separate q_proj/k_proj/v_proj), safetensors, fp16,
# MIT (its README's licence field). The official code used the transformers-4.36 conversion with a fused
# query_key_value: https://huggingface.co/susnato/phi-2 until that repo was re-laid-out in early 2024
# (https://github.com/DLYuanGod/TinyGPT-V/issues/11, https://github.com/BAAI-DCAI/Bunny/issues/2), then the copy at
# https://huggingface.co/spaces/llizhx/TinyGPT-V/tree/main/phi-2 (README, Mar 20 2024). Both hold Phi-2's tensors in
# another layout; the converter fuses q/k/v back exactly in the 4.36 order. No commit of those copies is on record.
# Revision 810d367871c1d460086d9f82db8696f2e0a0fcd0: a commit of microsoft/phi-2 in the transformers layout, pinned
# by several public projects. model-00001-of-00002.safetensors: its size (the Hub's x-linked-size header) and sha256
# (its LFS blob name in the Hub cache) as a public cache-setup script records them for this commit. vocab.json and
# merges.txt: sha256 as a public tokenizer-artifact build script (Julia, "phi2_bpe") checks them at this commit.
# Shard 2's size: the index's total_size of 5,559,367,680 tensor bytes minus shard 1's leaves about 564 MB.
PHI2_REPO = "microsoft/phi-2"
PHI2_REVISION = "810d367871c1d460086d9f82db8696f2e0a0fcd0"
PHI2_LICENCE = "MIT"


def _phi2(filename: str, *, size: int | None = None, sha256: str | None = None, approx_bytes: int | None = None,
          optional: bool = False) -> SourceFile:
    return SourceFile(PHI2, filename, HF, PHI2_LICENCE, repo_id=PHI2_REPO, revision=PHI2_REVISION, size=size,
                      sha256=sha256, approx_bytes=approx_bytes, optional=optional)


PHI2_FILES = (
    _phi2("config.json"),
    _phi2("model.safetensors.index.json"),
    _phi2("model-00001-of-00002.safetensors", size=4_995_584_424,
          sha256="7fbcdefa72edf7527bf5da40535b57d9f5bd3d16829b94a9d25d2b457df62e84"),
    _phi2("model-00002-of-00002.safetensors", approx_bytes=564_000_000),
    _phi2("tokenizer.json"),
    _phi2("tokenizer_config.json"),
    _phi2("vocab.json", sha256="3ba3c3109ff33976c4bd966589c11ee14fcaa1f4c9e5e154c2ed7f99d80709e7"),
    _phi2("merges.txt", sha256="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    _phi2("special_tokens_map.json", optional=True),
    _phi2("added_tokens.json", optional=True),
)

# --- EVA-CLIP ViT-g and the BLIP-2 Q-Former (LAVIS) ---------------------------------------------------------------
# URLs: the ones the official code loads (https://github.com/DLYuanGod/TinyGPT-V minigpt4/models/eva_vit.py and
# minigpt4/models/minigpt_v2.py), the same as https://github.com/salesforce/LAVIS (lavis/models/eva_vit.py,
# lavis/configs/models/blip2/blip2_pretrain_flant5xxl.yaml). Licences: EVA's MIT (https://github.com/baaivision/EVA
# LICENSE), LAVIS's BSD-3-Clause (LICENSE.txt). eva_vit_g.pth sha256: recorded for this URL by two unrelated public
# projects (Uni-NaVid download scripts, a VideoLLaMA asset audit); blip2_pretrained_flant5xxl.pth sha256: by the
# latter. Sizes: not on record: unverified. Estimates for the download total only: EVA ViT-g's 40 blocks hold about
# 1.01 B parameters (2.0 GB in fp16); BLIP-2's Q-Former with its text path, embeddings and T5 projection about
# 0.21 B (0.85 GB if stored in fp32).
LAVIS_BLIP2_URL = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2"
EVA_FILE = SourceFile(EVA, "eva_vit_g.pth", URL, "MIT", url=f"{LAVIS_BLIP2_URL}/eva_vit_g.pth",
                      sha256="99d2bb36c6b52c94fe6e2e12373afb27de57ae81378c3d8c53bf0e83b0f4275f",
                      approx_bytes=2_030_000_000)
BLIP2_FILE = SourceFile(BLIP2, "blip2_pretrained_flant5xxl.pth", URL, "BSD-3-Clause",
                        url=f"{LAVIS_BLIP2_URL}/blip2_pretrained_flant5xxl.pth",
                        sha256="4b3839ea6c617f315ead9bf4036bbb0f0cf6bf62695ecfc14968ea626af03a29",
                        approx_bytes=850_000_000)


# --- the named releases -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    """One stage of the release: its name on the command line (--model tinygptv-stageN) and its source files."""

    name: str
    stage: int
    files: tuple[SourceFile, ...]

    def fetch_command(self) -> str:
        return f"tinygptv fetch --stage {self.stage}"

    def role(self, role: str) -> list[SourceFile]:
        return [f for f in self.files if f.role == role]


RELEASES: Registry[Release] = Registry("release")
for _stage in (1, 2, 3, 4):
    RELEASES.register(f"tinygptv-stage{_stage}",
                      Release(f"tinygptv-stage{_stage}", _stage, (stage_checkpoint(_stage), *PHI2_FILES, EVA_FILE,
                                                                 BLIP2_FILE)))


def release_for_stage(stage: int) -> Release:
    return RELEASES[f"tinygptv-stage{stage}"]


MODELS_SUBDIR = "models"
DOWNLOADS_SUBDIR = "downloads"


def models_dir() -> Path:
    return cache_dir() / MODELS_SUBDIR


def downloads_dir() -> Path:
    return cache_dir() / DOWNLOADS_SUBDIR


def release_model_dir(name: str) -> Path:
    """The converted folder a release name stands for, or FileNotFoundError saying the command that makes it."""
    release = RELEASES[name]
    folder = models_dir() / name
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{name}: the official stage-{release.stage} model is not in {folder}; download and "
                                f"convert it with `{release.fetch_command()}` (about "
                                f"{release_download_bytes(release) / 1e9:.1f} GB), or pass --model with a folder")
    return folder


def release_download_bytes(release: Release) -> int:
    return sum(f.expected_bytes for f in release.files)


# --- --model: release, or random weights of a preset --------------------------------------------------------------
PRESET_PREFIX = "preset:"
MODEL_NAMES_HELP = ("a model folder of ours, a Hugging Face Hub id, tinygptv-nano (bundled), tinygptv-stage1..4 (the "
                    "official release, after `tinygptv fetch --stage N`) or preset:NAME (random weights)")


def requested_preset(name: str) -> str | None:
    """The preset whose random weights `--model NAME` asks for, or None for a model to load. `preset:NAME` always
    means random weights; a bare preset name does too, except a release name (tinygptv-stage1..4), which means the
    converted official model."""
    if name.startswith(PRESET_PREFIX):
        wanted = name[len(PRESET_PREFIX):]
        PRESETS[wanted]  # unknown: KeyError listing the presets
        return wanted
    if name in PRESETS and name not in RELEASES:
        return name
    return None
