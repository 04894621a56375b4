# What a cold `tinygptv ask` no longer does, checked to change nothing: LoRA is folded into the weights as they are
# read (no adapter modules built and merged: bit-identical weights), an inference load imports no peft, and the
# command skips Python's last garbage collections at exit.
from __future__ import annotations

import gc
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import torch
from conftest import tiny_model

from tinygptv import cli
from tinygptv.checkpoint.loading import load_model
from tinygptv.checkpoint.native import load_pretrained, save_pretrained
from tinygptv.model.lora import is_lora_param


def test_lora_merged_while_reading_equals_merging_the_built_model(tmp_path):
    model = tiny_model()
    assert model.config.lora.r > 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_lora_param(name):  # peft starts B at zero, where merging would change nothing
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    save_pretrained(model, tmp_path / "model")

    built = load_pretrained(tmp_path / "model").merge_lora()
    read = load_pretrained(tmp_path / "model", merge_lora=True)
    assert read.config.lora.r == built.config.lora.r == 0
    assert not any(is_lora_param(n) for n, _ in read.named_parameters())
    want, got = built.state_dict(), read.state_dict()
    assert want.keys() == got.keys()
    changed = [k for k in want if not torch.equal(want[k], got[k])]
    assert changed == []
    # and the adapters did matter: the merged weights differ from the saved base weights
    base = load_pretrained(tmp_path / "model").state_dict()
    assert not torch.equal(base["llm.model.layers.0.self_attn.dense.base_layer.weight"],
                           got["llm.model.layers.0.self_attn.dense.weight"])

    unmerged = load_model(str(tmp_path / "model"), merge_lora=False, quiet=True)  # eval's path still builds LoRA
    assert unmerged.config.lora.r > 0 and any(is_lora_param(n) for n, _ in unmerged.named_parameters())


def test_an_inference_load_imports_no_peft(tmp_path):
    save_pretrained(tiny_model(), tmp_path / "model")
    code = (f"import sys; from tinygptv.checkpoint.loading import load_model; load_model({str(tmp_path / 'model')!r}, "
            "quiet=True); print('peft' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_the_command_freezes_its_objects_before_exiting_with_mains_code(monkeypatch):
    frozen = []
    monkeypatch.setattr(cli, "main", lambda: 3)
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))
    with pytest.raises(SystemExit) as done:
        cli.run()
    assert done.value.code == 3 and frozen == [True]
    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["tinygptv"] == "tinygptv.cli:run"  # the installed command is run()
