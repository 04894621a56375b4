# A pickle reader that only rebuilds plain data (lists, dicts, tuples, sets, strings, numbers), for the REFER
# `refs(unc).p` / `refs(umd).p` files. Data path: refs(*).p -> [this] -> refer.py reader -> Sample -> ... -> model.
from __future__ import annotations

import builtins
import pickle
from pathlib import Path

from tinygptv.data.datasets.sample import DatasetError

# the only globals plain data needs: sets are pickled as a call to set/frozenset before protocol 4
_ALLOWED = {("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"), ("__builtin__", "frozenset")}


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle asked for a class or function."""


class PlainDataUnpickler(pickle.Unpickler):
    """Refuses every global but set/frozenset. A pickle can call any importable function while it loads; refusing
    globals means a downloaded annotation file can carry data but never run code."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return getattr(builtins, name)
        raise RefusedGlobal(f"refusing to load global {module}.{name}")


def load_plain_pickle(path: str | Path):
    """Load a pickle of plain data. Python-2 byte strings (the original REFER files) are decoded as UTF-8 (the
    official loader's ASCII default accepts a subset of that). A missing file is a FileNotFoundError; a pickle that
    needs any class or function, or is not a pickle, is a DatasetError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file not found")
    with open(path, "rb") as f:
        try:
            return PlainDataUnpickler(f, encoding="utf-8").load()
        except RefusedGlobal as e:
            raise DatasetError(f"{path}: not loaded: {e} (only plain lists, dicts, strings and numbers are "
                               f"accepted in an annotation pickle)") from None
        except Exception as e:  # truncated or not a pickle at all: EOFError, ValueError, KeyError, ...
            raise DatasetError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
