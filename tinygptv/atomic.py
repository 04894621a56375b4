# Atomic JSON writes shared by every command that leaves a result file (eval summaries, bench tables, training data).
# A temp file in the target's folder, then os.replace: a reader or a killed run never sees half a file.
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


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
