# `tinygptv fetch`: every source file of one official stage (release.py's table) from the Hugging Face Hub through
# huggingface_hub or from LAVIS's URLs through download.py, each checked against the table, then converted by
# official.py into cache_dir()/models/tinygptv-stageN, the folder `--model tinygptv-stageN` loads.
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

from tinygptv.atomic import write_json_atomic
from tinygptv.checkpoint.download import download_resumable, sha256_of
from tinygptv.checkpoint.official import convert_official
from tinygptv.checkpoint.release import (
    BLIP2,
    CHECKPOINT,
    EVA,
    HF,
    PHI2,
    Release,
    SourceFile,
    downloads_dir,
    models_dir,
)
from tinygptv.config import CONFIG_NAME

FULL_COMMIT = re.compile(r"[0-9a-f]{40}")  # a Hub revision that names one commit, as opposed to an abbreviation
FETCH_RECORD = "fetched-from.json"  # written into the model folder last: which sources it was converted from
BIG_FILE = 100 << 20  # files above this size get a "checking" line while their sha256 is computed


class FetchError(ValueError):
    pass


@dataclass
class Fetched:
    entry: SourceFile
    path: Path
    sha256: str
    size: int
    commit: str | None = None  # the full Hub commit the file came from, when read from the cache's snapshot path


def fetch_release(release: Release, out: Path | None = None, *, quiet: bool = False) -> Path:
    """Download what is missing, verify every file, convert, and return the model folder. A folder already
    converted from the same table entries is returned as it is, without touching the network."""
    out = Path(out) if out is not None else models_dir() / release.name
    if is_current(out, release):
        _say(quiet, f"{release.name}: already converted in {out}; nothing to download")
        return out
    fetched = [f for f in (fetch_file(entry, quiet=quiet) for entry in release.files) if f is not None]
    convert_fetched(release, fetched, out, quiet=quiet)
    return out


def fetch_file(entry: SourceFile, *, quiet: bool = False) -> Fetched | None:
    """One file, downloaded or reused, checked. None only for an optional file its revision does not have."""
    if entry.kind == HF:
        path = _from_hub(entry, quiet)
        if path is None:
            return None
        fetched = check(entry, path, quiet=quiet)
        fetched.commit = _snapshot_commit(path)
        if not FULL_COMMIT.fullmatch(entry.revision or "") and fetched.commit:
            _say(quiet, f"{entry.repo_id}@{entry.revision} is commit {fetched.commit}")
        return fetched
    target = downloads_dir() / entry.filename
    if target.is_file():
        return check(entry, target, quiet=quiet)
    part = _download(entry, target, quiet)
    fetched = check(entry, part, quiet=quiet)
    part.replace(target)
    fetched.path = target
    return fetched


def _from_hub(entry: SourceFile, quiet: bool) -> Path | None:
    """huggingface_hub's own download: its cache, resume, HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE all apply."""
    try:
        return Path(hf_hub_download(entry.repo_id, entry.filename, revision=entry.revision))
    except LocalEntryNotFoundError:
        if entry.optional:
            return None
        raise FetchError(f"{entry.source}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                         "HF_HUB_OFFLINE is set, or the Hub cannot be reached. Download it where the Hub is reachable "
                         "and copy the cache, or see README 'Getting the official weights' for the manual route") \
            from None
    except EntryNotFoundError:
        if entry.optional:
            _say(quiet, f"{entry.source}: not in this revision (optional, skipped)")
            return None
        raise FetchError(f"{entry.source}: the revision has no such file") from None
    except Exception as e:  # a gated repo, a wrong revision, a connection error: one line for the user
        raise FetchError(f"{entry.source}: could not be downloaded ({type(e).__name__}: {e})") from None


def _download(entry: SourceFile, target: Path, quiet: bool) -> Path:
    """<name>.part beside the target, resumed where an earlier run stopped; renamed only once it passes its check."""
    part = target.with_name(target.name + ".part")
    resuming = f" (resuming at {part.stat().st_size:,} bytes)" if part.exists() else ""
    _say(quiet, f"downloading {entry.url}{resuming}")
    download_resumable(str(entry.url), part, quiet=quiet)
    return part


def check(entry: SourceFile, path: Path, *, quiet: bool = False) -> Fetched:
    """Size and sha256 against the table. A file that fails is moved aside (renamed <name>.bad-<sha8>) so it is
    never used, and the error names both paths; a value the table lacks is printed so it can be reported."""
    size = path.stat().st_size
    if size > BIG_FILE:
        _say(quiet, f"checking {entry.filename} ({size / 1e9:.2f} GB)")
    digest = sha256_of(path)
    problems = []
    if entry.size is not None and size != entry.size:
        problems.append(f"size {size:,} bytes, expected {entry.size:,}")
    if entry.sha256 is not None and digest != entry.sha256:
        problems.append(f"sha256 {digest}, expected {entry.sha256}")
    if problems:
        moved = move_aside(path, digest)
        raise FetchError(f"{entry.source}: {'; '.join(problems)}. The file was moved aside to {moved} and will "
                         "not be used; run the command again to download it anew")
    if not entry.verified:
        missing = [name for name, value in (("size", entry.size), ("sha256", entry.sha256)) if value is None]
        _say(quiet, f"{entry.filename}: size {size:,}, sha256 {digest} (the table has no {' or '.join(missing)} "
                    "for it: unverified; please report these values)")
    return Fetched(entry, path, digest, size)


def move_aside(path: Path, digest: str) -> Path:
    """Rename the real file (a Hub cache's blob behind its snapshot link) to <name>.bad-<sha8>; drop the link so
    huggingface_hub downloads the file again."""
    real = path.resolve()
    moved = real.with_name(f"{real.name.removesuffix('.part')}.bad-{digest[:8]}")
    real.replace(moved)
    if path.is_symlink():
        path.unlink()
    return moved


def _snapshot_commit(path: Path) -> str | None:
    """A Hub cache path is .../snapshots/<commit>/<filename>: the commit a revision resolved to."""
    parent = path.parent
    return parent.name if parent.parent.name == "snapshots" and FULL_COMMIT.fullmatch(parent.name) else None


# --- conversion -----------------------------------------------------------------------------------------------------


def convert_fetched(release: Release, fetched: list[Fetched], out: Path, *, quiet: bool = False) -> Path:
    by_role = {role: [f for f in fetched if f.entry.role == role] for role in (CHECKPOINT, PHI2, EVA, BLIP2)}
    phi2_dirs = {f.path.parent for f in by_role[PHI2]}
    if len(phi2_dirs) != 1:
        raise FetchError(f"the Phi-2 files are not in one folder: {sorted(map(str, phi2_dirs))}")
    _say(quiet, f"converting into {out}")
    convert_official(by_role[CHECKPOINT][0].path, phi2_dirs.pop(), by_role[EVA][0].path, by_role[BLIP2][0].path, out,
                     stage=release.stage, quiet=quiet)
    write_json_atomic(out / FETCH_RECORD, {"release": release.name, "files": [record(f) for f in fetched]})
    _say(quiet, f"{release.name} is ready: tinygptv ask --model "
                f"{release.name if out == models_dir() / release.name else out} --image IMG \"question\"")
    return out


def record(f: Fetched) -> dict:
    return {"source": f.entry.source, "size": f.size, "sha256": f.sha256, "commit": f.commit}


def is_current(out: Path, release: Release) -> bool:
    """A converted folder whose record lists exactly the table's sources, with the sizes and hashes it records."""
    import json

    path = out / FETCH_RECORD
    if not (out / CONFIG_NAME).is_file() or not path.is_file():
        return False
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return False
    seen = {f.get("source"): f for f in files if isinstance(f, dict)}
    for entry in release.files:
        got = seen.get(entry.source)
        if got is None:
            if entry.optional:
                continue
            return False
        if (entry.size is not None and got.get("size") != entry.size) or \
                (entry.sha256 is not None and got.get("sha256") != entry.sha256):
            return False
    return True


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, flush=True)
