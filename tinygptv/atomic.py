# Atomic writes shared by every command that leaves a result: JSON files (eval summaries, bench tables, training data)
# and staging folders renamed onto model folders, checkpoints and caches. A reader or a killed run never sees half.
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


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


def write_json_atomic(path: str | os.PathLike, data, *, indent: int = 2) -> None:
    """An interrupted write leaves the previous version (or nothing), never a truncated file that parses as done."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
