# Command lines the bad-input suite runs (convert with the tiny fixture's head counts, train on the bundled tiny
# recipe) and the check every user error must pass: one line on stderr, prefixed with the command.
from __future__ import annotations

from pathlib import Path

from official_fixtures import TINY

ROOT = Path(__file__).resolve().parents[2]
TINY_DATA = ROOT / "examples" / "tiny-data" / "train.json"


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"tinygptv {command}: error: ") and err.count("\n") == 1, err
    return err


def convert_args(files, out: Path) -> list[str]:
    return ["convert", "--official-ckpt", str(files.official), "--phi2", str(files.phi2), "--eva", str(files.eva),
            "--blip2", str(files.blip2), "--out", str(out), "--vit-heads", str(TINY.vit_heads),
            "--qformer-heads", str(TINY.q_heads)]


def train_args(out: Path, *extra: str) -> list[str]:
    return ["train", str(ROOT / "configs" / "tiny.yaml"), f"output_dir={out}", f"datasets.0.args.ann_path={TINY_DATA}",
            "tensorboard=false", *extra]
