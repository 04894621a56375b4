# Atomic writes shared by every command that leaves a result: JSON files (eval summaries, bench tables, training data)
# and staging folders renamed onto model folders, checkpoints and caches. A reader or a killed run never sees half.
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


# Read once, at import: os.umask can only be read by setting it, which would race with other threads' file creation.
_UMASK = os.umask(0)
os.umask(_UMASK)


def staging_dir(target: Path) -> Path:
    """A new empty folder beside `target`, to be renamed onto it when complete. It gets an ordinary folder's
    permissions (the umask's): mkdtemp's 0700 would make a model folder or cache private once renamed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp.chmod(0o777 & ~_UMASK)
    return tmp


def readable(path: str | os.PathLike) -> None:
    """An ordinary file's permissions (the umask's): mkstemp and safetensors' writer both create files 0600, which
    would make exported weights or an eval summary unreadable by anyone else on a shared machine."""
    os.chmod(path, 0o666 & ~_UMASK)


def save_weights(state: dict, path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """A state dict as safetensors, with an ordinary file's permissions."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in state.items()}, path, metadata=metadata)
    readable(path)


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside `path` to write; renamed onto `path` with an ordinary file's permissions when the
    block finishes, deleted if it raises. An interrupted write leaves the previous version (or nothing), never a
    truncated file that reads as done."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data, *, indent: int = 2) -> None:
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=indent, ensure_ascii=False)
        f.write("\n")
