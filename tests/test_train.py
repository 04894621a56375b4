# Training: the loss drops on the bundled tiny recipe, a killed run resumes onto the same loss curve, the schedule
# and decay rule are LAVIS's, stage hand-offs keep trained weights, bad data is named or skipped, DDP matches one
# process, and the four stage recipes load and plan at full size.
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinygptv.config import preset
from tinygptv.data.datasets.sample import DatasetError
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.cli import main
from tinygptv.train.checkpointing import list_checkpoints
from tinygptv.train.loop import Trainer
from tinygptv.train.plan import plan_memory
from tinygptv.train.recipe import Recipe, Schedule, Tune, load_recipe
from tinygptv.train.schedule import learning_rate
from tinygptv.train.tune import apply_tune, build_optimizer
from tinygptv.checkpoint.native import load_pretrained

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def tiny_recipe(tmp_path, *overrides) -> Recipe:
    data = ROOT / "examples" / "tiny-data" / "train.json"
    return load_recipe(TINY, [f"output_dir={tmp_path / 'run'}", f"datasets.0.args.ann_path={data}",
                              "tensorboard=false", *overrides])


def test_tiny_recipe_trains_and_the_loss_drops(tmp_path):
    trainer = Trainer(tiny_recipe(tmp_path))
    summary = trainer.train()
    losses = [loss for _, loss in summary["losses"]]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    final = load_pretrained(tmp_path / "run" / "final")
    trained = trainer.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in final.state_dict().items())
    # the final folder holds only what trained and names its base relative to itself
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config["base_model"] == "../base"


def test_the_cli_says_where_a_run_stopped_and_never_redoes_a_finished_one(tmp_path, capsys):
    """--max-steps says it stopped and how to go on; running a finished run again leaves its final model alone."""
    data = ROOT / "examples" / "tiny-data" / "train.json"
    args = ["train", str(TINY), f"output_dir={tmp_path / 'run'}", f"datasets.0.args.ann_path={data}",
            "tensorboard=false", "schedule.iters_per_epoch=4", "schedule.max_epoch=1", "save_every=2"]
    assert main([*args, "--max-steps", "2"]) == 0
    assert "stopped at step 2 of 4 (--max-steps); the same command continues" in capsys.readouterr().err
    assert main(args) == 0
    final = tmp_path / "run" / "final" / "model.safetensors"
    written = final.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert "this run already finished (step 4 of 4)" in capsys.readouterr().err
    assert final.stat().st_mtime_ns == written


def test_resume_after_a_kill_continues_the_same_run(tmp_path):
    whole = Trainer(tiny_recipe(tmp_path / "a", "save_every=3")).train(max_steps=8)
    first = Trainer(tiny_recipe(tmp_path / "b", "save_every=3"))
    first.train(max_steps=5)  # checkpoints at steps 3; the "kill" after step 5 loses steps 4-5
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "run")] == ["checkpoint-0000003"]
    resumed = Trainer(tiny_recipe(tmp_path / "b", "save_every=3"))
    assert resumed.step == 3
    rest = resumed.train(max_steps=5)
    expected = dict(whole["losses"])
    for step, loss in rest["losses"]:
        assert loss == pytest.approx(expected[step], abs=1e-6), f"step {step}"
    a = {n: p for n, p in whole_model_params(tmp_path / "a").items()}
    b = whole_model_params(tmp_path / "b")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def whole_model_params(run_root: Path) -> dict:
    latest = list_checkpoints(run_root / "run")[-1]
    return dict(load_pretrained(latest / "model").state_dict())


def test_a_crash_while_saving_leaves_no_checkpoint_that_looks_complete(tmp_path, monkeypatch):
    trainer = Trainer(tiny_recipe(tmp_path, "save_every=2"))
    trainer.train(max_steps=2)
    import tinygptv.train.checkpointing as ckpt

    def crash(*a, **k):
        raise OSError("killed mid-write")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError):
        trainer.train(max_steps=2)
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-0000002"]
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert Trainer(tiny_recipe(tmp_path, "save_every=2")).step == 2


def test_schedule_is_lavis_linear_warmup_cosine():
    s = Schedule(init_lr=1e-4, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=10, max_epoch=2, iters_per_epoch=50)
    assert learning_rate(s, 0) == pytest.approx(1e-6)
    assert learning_rate(s, 5) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5)
    # after warm-up the cosine is computed from step 0, so it is already below init_lr
    assert learning_rate(s, 10) == pytest.approx(8e-5 + 2e-5 * 0.5 * (1 + math.cos(math.pi * 10 / 100)))
    assert learning_rate(s, 100) == pytest.approx(8e-5)
    rising = Schedule(init_lr=1e-5, min_lr=8e-5, warmup_steps=0, max_epoch=1, iters_per_epoch=10)
    assert learning_rate(rising, 0) < learning_rate(rising, 5) < learning_rate(rising, 10)  # stage 4 as released


@pytest.mark.parametrize("name, llm, expected", [
    ("tinygptv-stage1", "norms", 13_809_664),
    ("tinygptv-stage2", "lora+norms", 45_266_944),
])
def test_tune_policy_gives_the_official_trainable_sets(name, llm, expected):
    with torch.device("meta"):
        model = TinyGPTV(preset(name))
    groups = apply_tune(model, Tune(llm=llm))
    assert sum(p.numel() for ps in groups.values() for _, p in ps) == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_weight_decay_only_on_matrices():
    model = TinyGPTV(preset("tiny"))
    opt = build_optimizer(apply_tune(model, Tune()), 0.05, {"projector": 2.0})
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            decays = p.ndim >= 2 and not any(k in names[id(p)] for k in ("bias", "ln", "bn"))
            assert group["weight_decay"] == (0.05 if decays else 0.0), names[id(p)]
        assert group["lr_scale"] == (2.0 if group["name"].startswith("projector") else 1.0)


def test_stage1_to_stage2_hand_off_keeps_the_trained_norms(tmp_path):
    stage1 = Trainer(tiny_recipe(tmp_path / "s1", "model.config.lora.r=0", "tune.llm=norms", "schedule.max_epoch=1",
                                 "schedule.iters_per_epoch=3"))
    stage1.train()
    trained = stage1.model.state_dict()
    stage2 = Trainer(tiny_recipe(tmp_path / "s2", f"model.init_from={tmp_path / 's1' / 'run' / 'final'}"))
    got = stage2.model.state_dict()
    norm = "llm.model.layers.1.post_layernorm.weight"
    assert not torch.equal(trained[norm], torch.ones_like(trained[norm]))  # stage 1 changed it
    assert torch.equal(got[norm], trained[norm])
    qkv = "llm.model.layers.0.self_attn.query_key_value"
    assert torch.equal(got[f"{qkv}.base_layer.weight"], trained[f"{qkv}.weight"])
    assert all("lora_" in k for k in stage2.model.newly_initialised)
    assert len(stage2.model.newly_initialised) == 8  # A and B on QKV and dense, 2 layers


def _broken_data(tmp_path, malformed: bool = False) -> Path:
    data = tmp_path / "data"
    shutil.copytree(ROOT / "examples" / "tiny-data", data)
    records = json.loads((data / "train.json").read_text())
    (data / records[2]["image"]).write_bytes(b"not a png")
    os.remove(data / records[5]["image"])
    if malformed:
        del records[7]["conversations"]
    (data / "train.json").write_text(json.dumps(records))
    return data / "train.json"


def test_bad_records_stop_the_run_with_their_name(tmp_path):
    ann = _broken_data(tmp_path)
    trainer = Trainer(tiny_recipe(tmp_path, f"datasets.0.args.ann_path={ann}", "datasets.0.batch_size=8"))
    with pytest.raises(DatasetError, match=r"dataset 'llava_json'(, record)? train\.json:\d: .*(blue_circle\.png: not "
                                           r"an image in a supported format|green_square\.png not found)"):
        trainer.train(max_steps=1)
    with pytest.raises(DatasetError, match=r"dataset 'llava_json': train\.json:7: missing field 'conversations'.*"
                                           r"on_bad_record: skip"):
        Trainer(tiny_recipe(tmp_path, f"datasets.0.args.ann_path={_broken_data(tmp_path / 'm', malformed=True)}"))


def test_bad_records_can_be_skipped_and_are_counted(tmp_path):
    ann = _broken_data(tmp_path, malformed=True)
    summary = Trainer(tiny_recipe(tmp_path, f"datasets.0.args.ann_path={ann}", "on_bad_record=skip",
                                  "datasets.0.batch_size=2")).train(max_steps=8)
    counts = summary["skipped"]["llava_json"]
    assert counts["malformed record"] == 1 and counts["unreadable image"] >= 1 and counts["missing image"] >= 1
    assert len(summary["losses"]) == 8


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_stage_recipes_load_and_plan_at_full_size(stage):
    recipe = load_recipe(ROOT / "configs" / f"tinygptv_stage{stage}.yaml", ["model.init_from=null"])
    plan = plan_memory(recipe)
    assert plan["trainable_parameters"] == (13_809_664 if stage == 1 else 45_266_944)
    with_ckpt = plan["total_gb"]["with gradient checkpointing"]
    assert with_ckpt < plan["total_gb"]["without checkpointing"]
    assert 7 < with_ckpt < 24  # frozen weights alone are ~7.4 GB in half precision


@pytest.mark.parametrize("stage", [1, 2, 3, 4, 5, 6, 7])
def test_nano_recipes_build_every_dataset_they_name(stage):
    """`make nano-model` runs these unattended for most of an hour: a misspelt dataset argument must fail here,
    not after stage 3. (The text-only answers file is written by the pipeline itself, so it is not read here.)"""
    from tinygptv.data.datasets import DATASETS

    recipe = load_recipe(ROOT / "configs" / f"nano_stage{stage}.yaml")
    for entry in recipe.datasets:
        if entry.name == "llava_json":
            assert entry.args["ann_path"] == "runs/nano_text/answers.json"
            continue
        dataset = DATASETS[entry.name](**{"seed": recipe.seed, "check_images": False, **entry.args})
        assert len(dataset) > 0 and dataset[0].turns[0][1]


def test_recipe_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("tune: {", "tune: {qformr: full, "))
    with pytest.raises(ValueError, match=r"tune: unknown field\(s\) \['qformr'\]"):
        load_recipe(bad)
    with pytest.raises(ValueError, match="tune.llm: 'everything' is not one of"):
        load_recipe(TINY, ["tune.llm=everything"])


@pytest.mark.slow
def test_ddp_with_two_processes_matches_one_process(tmp_path):
    """Two gloo processes, each with half of every global batch, end with the weights of one process (the fixture
    answers all have the same token count per batch position, so mean-of-means equals the global mean)."""
    data = tmp_path / "data"
    shutil.copytree(ROOT / "examples" / "tiny-data", data)
    records = json.loads((data / "train.json").read_text())
    for i, r in enumerate(records):  # equal answer lengths: every rank averages over the same number of tokens
        r["conversations"][1]["value"] = ("cat", "dog")[i % 2]
        r["conversations"][3]["value"] = ("box", "orb")[i // 4]
    (data / "train.json").write_text(json.dumps(records))
    common = [f"datasets.0.args.ann_path={data / 'train.json'}", "tensorboard=false",
              "schedule.max_epoch=1", "schedule.iters_per_epoch=4", "model.config.llm.resid_pdrop=0.0",
              "model.config.lora.dropout=0.0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name, nproc in (("one", 1), ("two", 2)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "tinygptv.cli", "train", str(TINY), f"output_dir={tmp_path / name}", *common]
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
    one = load_pretrained(tmp_path / "one" / "final").state_dict()
    two = load_pretrained(tmp_path / "two" / "final").state_dict()
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 1e-4, f"largest weight difference {worst}"
