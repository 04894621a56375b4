# Where a converted engine model lives and when it may be reused. One folder per (model, backend, mode), named by a key
# hashed from everything the conversion depends on: the model's config, its weight files, the mode, the engine's
# versions and the export format. Written once through atomic.writing_dir; loading.py reads it on every later load.
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

from tinygptv.atomic import write_json_atomic, writing_dir
from tinygptv.config import CONFIG_NAME, WEIGHTS_NAME, cache_dir

ENGINE_DIR = "engine"  # inside a model folder: its conversions, dropped when the folder is saved again
CACHE_SUBDIR = "engines"  # in cache_dir(): conversions of presets, bundled models and Hub ids
META = "engine.json"  # written last: its presence marks a complete conversion
# Bump when the exported graph changes, so conversions made by an older tinygptv are not reused.
EXPORT_FORMAT = 2  # 2: the vision tower is converted too (vision.xml)
ENGINE_PACKAGES = {"openvino": ("openvino", "nncf")}


def package_versions(backend: str) -> dict[str, str]:
    """Installed versions of the engine's packages, read from their metadata (no import)."""
    out = {}
    for name in ENGINE_PACKAGES[backend]:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def weight_fingerprint(model_dir: Path, depth: int = 0) -> list:
    """(file, size, modification time) of the folder's config and weights and of each folder its config.base_model
    names, so a retrained or re-exported model, or a changed base, never reuses an old conversion."""
    out = []
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        path = model_dir / name
        if path.is_file():
            stat = path.stat()
            out.append([depth, name, stat.st_size, stat.st_mtime_ns])  # no path: a moved folder keeps its key
    try:
        base = json.loads((model_dir / CONFIG_NAME).read_text()).get("base_model")
    except (OSError, ValueError):
        base = None
    if base and depth < 8 and (model_dir / base).is_dir():
        out += weight_fingerprint(model_dir / base, depth + 1)
    return out


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def engine_key(config: dict, backend: str, mode: str, weights: list) -> str:
    return _digest({"config": config, "backend": backend, "mode": mode, "weights": weights,
                    "versions": package_versions(backend), "export_format": EXPORT_FORMAT})


def _writable(folder: Path) -> bool:
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


@dataclass
class EngineFolder:
    """One conversion: `path` holds the engine's files and engine.json (the key, the mode, the versions)."""

    path: Path
    key: str
    backend: str
    mode: str
    model: str = ""  # the model it converts (config and weights): what a newer conversion of it supersedes

    def complete(self) -> bool:
        return read_meta(self.path).get("key") == self.key

    def write(self, fill: Callable[[Path], None]) -> None:
        """fill(staging folder) writes the engine's files; engine.json goes last, then the folder is swapped in and
        conversions this one supersedes are removed: those of the same model, backend and mode made by another
        engine version or export format. The cache holds many models' conversions side by side."""
        with writing_dir(self.path, lambda name: True, what="engine folder", marker=META) as staged:
            fill(staged)
            meta = {"key": self.key, "backend": self.backend, "mode": self.mode, "model": self.model,
                    "versions": package_versions(self.backend), "export_format": EXPORT_FORMAT}
            write_json_atomic(staged / META, meta)
        mine = {"backend": self.backend, "mode": self.mode, "model": self.model}
        for old in self.path.parent.iterdir():
            meta = read_meta(old)
            if old != self.path and self.model and all(meta.get(name) == value for name, value in mine.items()):
                shutil.rmtree(old, ignore_errors=True)


def read_meta(folder: Path) -> dict:
    """A conversion's engine.json; empty when it is missing or unreadable (an incomplete conversion)."""
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def engine_folder(config: dict, backend: str, mode: str, model_dir: Path | None, *, beside: bool = True
                  ) -> EngineFolder:
    """Inside the model folder when there is one, `beside` allows it and we may write there (its conversions then
    move and go with it), else in cache_dir()/engines (presets, the bundled model, Hub downloads, read-only
    folders). model_dir None: a preset, whose random weights are the same every run."""
    weights = weight_fingerprint(model_dir) if model_dir is not None else [["preset", "shifted-repeated-noise"]]
    key = engine_key(config, backend, mode, weights)
    inside = beside and model_dir is not None and _writable(model_dir) and not _is_hub_snapshot(model_dir)
    root = model_dir / ENGINE_DIR if inside else cache_dir() / CACHE_SUBDIR
    return EngineFolder(root / f"{backend}-{mode}-{key}", key, backend, mode, _digest({"config": config,
                                                                                       "weights": weights}))


def _is_hub_snapshot(folder: Path) -> bool:
    """huggingface_hub's cache (…/snapshots/<revision>): files there are links into its blob store, not ours."""
    return folder.parent.name == "snapshots"
