# Fixtures of the bad-input suite: a tiny model folder with random weights, for checks that need a model to load but
# not a right answer (the trained colour model of tests/conftest.py is used where the answer matters).
from __future__ import annotations

import pytest

from conftest import tiny_model
from tinygptv.checkpoint.native import save_pretrained


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("models") / "tiny-random"
    save_pretrained(tiny_model(), out)
    return str(out)
