# Damaged model folders and hostile weight files: a truncated or mis-shaped model.safetensors, a missing tensor, a
# broken config.json, and pickles whose __reduce__ would run code (as an official checkpoint, a REFER annotation file,
# a training state). Loading names the file (and the tensor) in one line; no pickle ever runs code.
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bad_inputs.commands import convert_args, one_line_error, train_args
from bad_inputs.hostile import malicious_pickle
from official_fixtures import write_official_set
from tinygptv.checkpoint.native import CheckpointError
from tinygptv.cli import main
from tinygptv.data.datasets.safe_pickle import load_plain_pickle
from tinygptv.data.datasets.sample import DatasetError
from tinygptv.train.checkpointing import load_trainer_state

TENSOR = "projector.llama_proj.weight"


def damaged_copy(tiny_dir, tmp_path, damage: str):
    folder = tmp_path / damage
    shutil.copytree(tiny_dir, folder)
    weights = folder / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "config not JSON":
        (folder / "config.json").write_text("{not json")
    else:
        state = load_file(weights)
        if damage == "mis-shaped":
            state[TENSOR] = torch.zeros(3, 3)
        else:
            del state[TENSOR]
        save_file(state, weights, metadata={"format": "pt"})
    return folder


DAMAGE = {
    "truncated": "model.safetensors: cannot be read as safetensors",
    "empty": "model.safetensors: cannot be read as safetensors",
    "mis-shaped": f"wrong shapes (1): {TENSOR}: file (3, 3) vs model (48, 32)",
    "missing tensor": f"missing keys (1): {TENSOR}",
    "config not JSON": "config.json: not valid JSON",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_model_folder_is_one_line_naming_the_file_and_tensor(tiny_dir, tmp_path, damage, capsys):
    folder = damaged_copy(tiny_dir, tmp_path, damage)
    assert main(["ask", "--model", str(folder), "--max-new-tokens", "1", "hi"]) == 2
    err = one_line_error(capsys, "ask")
    assert str(folder) in err and DAMAGE[damage] in err


def test_a_malicious_official_checkpoint_runs_no_code(tmp_path, capsys):
    files = write_official_set(tmp_path / "official", stage=3)
    marker = tmp_path / "code-ran"
    malicious_pickle(files.official, marker)
    assert main(convert_args(files, tmp_path / "out")) == 2
    err = one_line_error(capsys, "convert")
    assert f"{files.official}: holds Python objects other than tensors" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_malicious_refer_pickle_runs_no_code(tmp_path):
    marker = tmp_path / "code-ran"
    with pytest.raises(DatasetError, match=r"refs\(unc\)\.p: not loaded: refusing to load global io\.open"):
        load_plain_pickle(malicious_pickle(tmp_path / "refs(unc).p", marker))
    assert not marker.exists()


def test_a_malicious_training_state_runs_no_code(tmp_path):
    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "checkpoint-0000001"
    checkpoint.mkdir()
    malicious_pickle(checkpoint / "trainer_state.pt", marker)
    with pytest.raises(CheckpointError, match="trainer_state.pt: holds Python objects other than tensors"):
        load_trainer_state(checkpoint)
    assert not marker.exists()


def test_resuming_from_a_malicious_training_state_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, "save_every=1", "--max-steps", "1")) == 0
    capsys.readouterr()
    malicious_pickle(run / "checkpoint-0000001" / "trainer_state.pt", tmp_path / "code-ran")
    assert main(train_args(run, "save_every=1", "--max-steps", "1")) == 2
    assert "trainer_state.pt" in one_line_error(capsys, "train")
