# Every command that writes a folder (export, convert, quantize, train, eval), pointed at the wrong place: a folder
# holding someone else's files, a file, a path under a file. Nothing is lost: the command refuses in one line naming
# the folder, what is in it and --overwrite (which writes beside those files and keeps them). And a writer killed
# with SIGKILL mid-write leaves no folder that looks complete; the next run cleans up after it.
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bad_inputs.commands import ROOT, convert_args, one_line_error, train_args
from official_fixtures import write_official_set
from tinygptv.atomic import STAGING_SUFFIX, clean_stale
from tinygptv.checkpoint.native import load_pretrained
from tinygptv.cli import main
from tinygptv.eval.runner import check_out_dir
from tinygptv.train.checkpointing import list_checkpoints



def precious_folder(path: Path) -> Path:
    """A folder of the user's: a photo, notes and a sub-folder."""
    (path / "holiday").mkdir(parents=True)
    (path / "notes.txt").write_text("keep me")
    (path / "holiday" / "beach.jpg").write_bytes(b"\xff\xd8 a photo")
    return path


def intact(path: Path) -> bool:
    return (path / "notes.txt").read_text() == "keep me" and (path / "holiday" / "beach.jpg").is_file()


def test_export_refuses_a_folder_of_someone_else_and_overwrite_keeps_its_files(tiny_dir, tmp_path, capsys):
    out = precious_folder(tmp_path / "mine")
    assert main(["export", tiny_dir, "--out", str(out)]) == 2
    err = one_line_error(capsys, "export")
    assert str(out) in err and "holiday, notes.txt" in err and "--overwrite" in err
    assert intact(out) and not (out / "config.json").exists()
    assert main(["export", tiny_dir, "--out", str(out), "--overwrite"]) == 0
    assert intact(out) and load_pretrained(out).config.to_dict() == load_pretrained(tiny_dir).config.to_dict()


@pytest.mark.parametrize("command", ["export", "convert"])
def test_an_output_that_is_a_file_or_under_one_is_one_line(command, tiny_dir, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    files = write_official_set(tmp_path / "official", stage=3) if command == "convert" else None
    for out, words in ((notes, "is a file, not a model folder"), (notes / "model", f"{notes} is a file")):
        args = convert_args(files, out) if files else ["export", tiny_dir, "--out", str(out)]
        assert main(args) == 2
        assert words in one_line_error(capsys, command)
    assert notes.read_text() == "keep me"


def test_convert_refuses_a_folder_of_someone_else(tmp_path, capsys):
    files = write_official_set(tmp_path / "official", stage=3)
    out = precious_folder(tmp_path / "mine")
    assert main(convert_args(files, out)) == 2
    assert "holiday, notes.txt" in one_line_error(capsys, "convert") and intact(out)


def test_train_refuses_an_output_dir_that_is_not_a_run_folder(tmp_path, capsys):
    out = precious_folder(tmp_path / "mine")
    assert main(train_args(out, "--max-steps", "1")) == 2
    err = one_line_error(capsys, "train")
    assert "holiday, notes.txt" in err and "training run folder" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["holiday", "notes.txt"]  # nothing written, nothing removed


@pytest.mark.slow
def test_train_overwrite_keeps_foreign_files_and_a_run_folder_resumes(tmp_path, capsys):
    out = precious_folder(tmp_path / "mine")
    assert main(train_args(out, "save_every=1", "keep_checkpoints=1", "--max-steps", "2", "--overwrite")) == 0
    assert intact(out) and [p.name for p in list_checkpoints(out)] == ["checkpoint-0000002"]
    run = tmp_path / "run"
    assert main(train_args(run, "save_every=1", "--max-steps", "1")) == 0
    assert main(train_args(run, "save_every=1", "--max-steps", "1")) == 0  # a run folder of ours: no flag needed
    assert "resumed from" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-0000001", "checkpoint-0000002"]


def test_eval_refuses_a_folder_of_someone_else_before_loading_a_model(tmp_path, capsys):
    out = precious_folder(tmp_path / "mine")
    assert main(["eval", "--benchmark", "easyvqa", "--model", "/nonexistent-model", "--out", str(out)]) == 2
    assert "holiday, notes.txt" in one_line_error(capsys, "eval") and intact(out)
    (out / "easyvqa.run.json").write_text("{}")
    check_out_dir(out)  # a folder eval has written into: a rerun resumes there, beside the user's files
    check_out_dir(tmp_path / "new")
    check_out_dir(out / "holiday", overwrite=True)


# --- killed writers ---------------------------------------------------------------------------------------------------

# Runs the CLI with the weights writer patched to die by SIGKILL once `TINYGPTV_KILL_AT` weights files are written:
# the kill lands inside a staging folder, with the weights on disk and config.json (the completion marker) not yet.
KILLED_CLI = """
import os, signal, sys
import tinygptv.checkpoint.native as native
real, left = native.save_weights, int(os.environ["TINYGPTV_KILL_AT"])
def save_then_die(*args, **kwargs):
    global left
    real(*args, **kwargs)
    left -= 1
    if left == 0:
        os.kill(os.getpid(), signal.SIGKILL)
native.save_weights = save_then_die
from tinygptv.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_killed(args: list[str], kill_at: int = 1) -> None:
    ran = subprocess.run([sys.executable, "-c", KILLED_CLI, *args], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TINYGPTV_KILL_AT": str(kill_at)}, cwd=ROOT)
    assert ran.returncode == -signal.SIGKILL, ran.stderr


def staging_beside(target: Path) -> list[str]:
    return [p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")
            and p.name.endswith(STAGING_SUFFIX)]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["export", "convert"])
def test_a_killed_model_writer_leaves_nothing_that_looks_complete(command, tiny_dir, tmp_path):
    out = tmp_path / "model"
    args = (convert_args(write_official_set(tmp_path / "official", stage=3), out) if command == "convert"
            else ["export", tiny_dir, "--out", str(out)])
    run_killed(args)
    assert not out.exists() and len(staging_beside(out)) == 1  # the weights were written, inside the staging folder
    assert main(args) == 0
    assert staging_beside(out) == [] and (out / "config.json").is_file()
    load_pretrained(out)


@pytest.mark.slow
def test_a_kill_between_the_two_renames_gives_the_previous_version_back(tiny_dir, tmp_path):
    """replace_dir moves the old folder aside, then the new one in; a kill in between is undone by the next writer."""
    out = tmp_path / "model"
    assert main(["export", tiny_dir, "--out", str(out)]) == 0
    before = json.loads((out / "config.json").read_text())
    killer = KILLED_CLI.replace("import tinygptv.checkpoint.native as native", """import tinygptv.atomic as atomic
import tinygptv.checkpoint.native as native
real_replace = os.replace
def replace_then_die(src, dst):
    real_replace(src, dst)
    if ".old-" in os.fspath(dst):
        os.kill(os.getpid(), signal.SIGKILL)
atomic.os.replace = replace_then_die""")
    ran = subprocess.run([sys.executable, "-c", killer, "export", tiny_dir, "--out", str(out)], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "TINYGPTV_KILL_AT": "0"}, cwd=ROOT)
    assert ran.returncode == -signal.SIGKILL, ran.stderr
    assert not out.exists()  # between the renames: the old version aside, the new one still staged
    clean_stale(out)
    assert json.loads((out / "config.json").read_text()) == before and staging_beside(out) == []


@pytest.mark.slow
def test_a_killed_training_checkpoint_is_not_resumed_from(tmp_path):
    run = tmp_path / "run"
    run_killed(train_args(run, "save_every=1", "--max-steps", "1"), kill_at=2)  # the base model, then the checkpoint
    assert list_checkpoints(run) == [] and len(staging_beside(run / "checkpoint-0000001")) == 1
    assert main(train_args(run, "save_every=1", "--max-steps", "1")) == 0  # starts again from step 0
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-0000001"]
    assert not [p for p in run.iterdir() if p.name.endswith(STAGING_SUFFIX)]
