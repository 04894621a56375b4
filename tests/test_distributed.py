# Training on several processes, on the CPU with gloo, launched as users launch it (torchrun): FSDP and DDP with
# gradient accumulation end with the weights of one process, gradients are reduced once per optimizer step, a sharded
# run killed while saving resumes to exactly the weights of an uninterrupted run (and its checkpoint on one process),
# and two "nodes" meet through torchrun's c10d rendezvous on 127.0.0.1. Run as a script (by torchrun), this file is
# the worker those tests launch.
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
STEPS, SAVE_EVERY = 6, 3
TIMEOUT_S = 240  # a launch that takes longer has hung in a collective: fail instead of hanging CI
# No dropout: each process draws its own masks, so only a deterministic model can equal one process exactly.
COMMON = ["tensorboard=false", "schedule.max_epoch=1", f"schedule.iters_per_epoch={STEPS}", f"save_every={SAVE_EVERY}",
          "keep_checkpoints=3", "datasets.0.batch_size=2", "model.config.llm.resid_pdrop=0.0",
          "model.config.lora.dropout=0.0"]
# FSDP with what touches sharded weights: accumulation, clipping, the vision cache (and, on two nodes, recomputation).
FSDP = ["distributed=fsdp", "accum_grad_steps=2", "grad_clip=1.0", "cache_vision_features=true"]
DDP = ["distributed=ddp", "accum_grad_steps=3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The fixture conversations with answers of one token count per position, five of the eight without an image.
    Each process averages the loss over its own answer tokens, so N processes equal one process only where every
    share has as many. The text-only records (chosen for the seed's order) make micro-batches where one process has
    no image and another has one, and whole steps without an image, in both the FSDP and the DDP runs."""
    import shutil

    folder = tmp_path_factory.mktemp("data")
    shutil.copytree(ROOT / "examples" / "tiny-data", folder, dirs_exist_ok=True)
    records = json.loads((folder / "train.json").read_text())
    for i, record in enumerate(records):
        record["conversations"][1]["value"] = ("cat", "dog")[i % 2]
        record["conversations"][3]["value"] = ("box", "orb")[i // 4]
        if i in (1, 2, 4, 5, 6):
            del record["image"]
    (folder / "train.json").write_text(json.dumps(records))
    return folder / "train.json"


def overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"datasets.0.args.ann_path={data}", f"output_dir={out}", *COMMON, *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*launchers: list[str], timeout: float = TIMEOUT_S) -> list[subprocess.CompletedProcess]:
    """Start every torchrun command at once (two "nodes" need each other), wait for all of them. A launch past
    `timeout` is stopped with SIGTERM (torchrun then stops its workers) and the test fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for args in launchers]
    done = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.communicate(timeout=60)
            pytest.fail(f"torchrun still running after {timeout} s (a hung collective?): {proc.args}")
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def run_workers(data: Path, out: Path, *extra: str, nproc: int = 2, kill_at_save: int = 0):
    args = ["--standalone", f"--nproc_per_node={nproc}", __file__, str(out / "logs"), str(kill_at_save), str(TINY),
            *overrides(data, out, *extra)]
    return launch(args)[0]


def one_process(data: Path, out: Path, *extra: str) -> None:
    from tinygptv.train.loop import Trainer
    from tinygptv.train.recipe import load_recipe

    Trainer(load_recipe(TINY, overrides(data, out, *extra))).train()


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    from tinygptv.checkpoint.native import load_pretrained

    return dict(load_pretrained(run / "final").state_dict())


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def logs(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "logs").glob("rank*.json"))]


def assert_reduced_once_per_step(run: Path, accum: int) -> None:
    """Each log mark is (gradient reductions so far, share has an image, batch has an image) at the start of a
    micro-batch: the count may only change between optimizer steps, and must change at each one."""
    for log in logs(run):
        counts = [mark[0] for mark in log["marks"]]
        steps = [counts[i:i + accum] for i in range(0, len(counts), accum)]
        assert all(len(set(step)) == 1 for step in steps), f"reduced inside an accumulation: {steps}"
        firsts = [step[0] for step in steps]
        assert all(a < b for a, b in zip(firsts, firsts[1:])), f"no reduction in some step: {firsts}"


def assert_text_only_shares_and_steps_occurred(run: Path, accum: int) -> None:
    """The cases the blank image is for: a process without an image beside one with, and a step without any."""
    shares = [mark[1:] for log in logs(run) for mark in log["marks"]]
    assert [False, True] in shares, "no micro-batch where this process had no image but another had one"
    batch_has_image = [mark[2] for mark in logs(run)[0]["marks"]]
    steps = [batch_has_image[i:i + accum] for i in range(0, len(batch_has_image), accum)]
    assert [False] * accum in steps, "no optimizer step without an image"


@pytest.fixture(scope="module")
def fsdp_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    run = run_workers(data, out, *FSDP)
    assert run.returncode == 0, run.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def fsdp_recipe_alone(data, tmp_path_factory) -> Path:
    """The FSDP recipe on one process (which trains plainly)."""
    out = tmp_path_factory.mktemp("alone")
    one_process(data, out, *FSDP)
    return out


@pytest.fixture(scope="module")
def killed_run(data, tmp_path_factory) -> Path:
    """The FSDP run, killed (SIGKILL) while writing its second checkpoint; tests resume copies of it."""
    out = tmp_path_factory.mktemp("killed")
    killed = run_workers(data, out, *FSDP, kill_at_save=STEPS)
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-4000:]
    return out


@pytest.mark.slow
def test_fsdp_on_two_processes_ends_with_the_weights_of_one(fsdp_run, fsdp_recipe_alone):
    worst = largest_difference(final_weights(fsdp_recipe_alone), final_weights(fsdp_run))
    assert worst < 1e-4, f"largest weight difference {worst}"
    # the checkpoint gathered from the shards holds the optimizer state of one process, keyed by parameter name
    from tinygptv.train.checkpointing import checkpoint_dir, load_trainer_state

    one = load_trainer_state(checkpoint_dir(fsdp_recipe_alone, STEPS))["optimizer"]["state"]
    two = load_trainer_state(checkpoint_dir(fsdp_run, STEPS))["optimizer"]["state"]
    assert one.keys() == two.keys() and all(isinstance(k, str) for k in two)
    for name in one:
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(two[name][key], one[name][key], rtol=1e-3, atol=1e-7, msg=f"{name} {key}")
    assert_reduced_once_per_step(fsdp_run, accum=2)
    assert_text_only_shares_and_steps_occurred(fsdp_run, accum=2)
    # one unit per vision block and decoder layer, the Q-Former, the projection; frozen weights split in two
    for log in logs(fsdp_run):
        assert {"FSDPEvaBlock", "FSDPTinyGPTVPhiDecoderLayer", "FSDPQFormerConnector", "FSDPProjector",
                "FSDPTrainForward"} <= set(log["units"])
        assert log["frozen_held"] < 0.55 * log["frozen_total"]


@pytest.mark.slow
def test_ddp_with_accumulation_on_two_processes_ends_with_the_weights_of_one(data, tmp_path):
    run = run_workers(data, tmp_path / "two", *DDP)
    assert run.returncode == 0, run.stderr[-4000:]
    one_process(data, tmp_path / "one", *DDP)
    worst = largest_difference(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))
    assert worst < 1e-4, f"largest weight difference {worst}"
    assert_reduced_once_per_step(tmp_path / "two", accum=3)
    assert_text_only_shares_and_steps_occurred(tmp_path / "two", accum=3)


@pytest.mark.slow
def test_a_sharded_run_killed_while_saving_resumes_to_the_uninterrupted_weights(data, fsdp_run, killed_run,
                                                                              tmp_path):
    import shutil

    from tinygptv.train.checkpointing import list_checkpoints

    out = tmp_path / "killed"
    shutil.copytree(killed_run, out)
    assert [p.name for p in list_checkpoints(out)] == [f"checkpoint-{SAVE_EVERY:07d}"]
    assert list(out.glob(".checkpoint-*.tmp")), "the kill came before the save had started writing"
    assert not (out / "final").exists()
    resumed = run_workers(data, out, *FSDP)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert [log["start"] for log in logs(out)] == [SAVE_EVERY, SAVE_EVERY]
    assert not list(out.glob(".checkpoint-*.tmp"))
    whole, after_kill = final_weights(fsdp_run), final_weights(out)
    assert all(torch.equal(whole[k], after_kill[k]) for k in whole)


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_on_one_process(data, killed_run, fsdp_recipe_alone, tmp_path):
    """The checkpoint gathered from two FSDP processes is the one-process format: one process continues it."""
    import shutil

    out = tmp_path / "continued"
    shutil.copytree(killed_run, out)
    one_process(data, out, *FSDP)
    worst = largest_difference(final_weights(fsdp_recipe_alone), final_weights(out))
    assert worst < 1e-4, f"largest weight difference {worst}"


@pytest.mark.slow
def test_two_nodes_meet_through_c10d_rendezvous_on_localhost(data, fsdp_run, tmp_path):
    """Two torchrun launchers, one process each, as two machines would run them; the c10d rendezvous on 127.0.0.1
    makes them one job of two processes, which trains as two processes on one node, here with gradient
    checkpointing on (recomputation gives the same numbers)."""
    out = tmp_path / "nodes"
    port = free_port()
    node = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=test-two-nodes", "--local-addr=127.0.0.1", __file__, str(out / "logs"), "0", str(TINY),
            *overrides(data, out, *FSDP, "gradient_checkpointing=true")]
    for run in launch(node, node):
        assert run.returncode == 0, run.stderr[-4000:]
    assert sorted(log["node"] for log in logs(out)) == ["0", "1"]
    worst = largest_difference(final_weights(fsdp_run), final_weights(out))
    assert worst < 1e-6, f"largest weight difference {worst}"


def test_an_older_single_process_checkpoint_still_resumes(data, tmp_path):
    """Checkpoints written before the optimizer state was keyed by parameter name hold torch's own layout."""
    from tinygptv.train.checkpointing import STATE_NAME, checkpoint_dir
    from tinygptv.train.loop import Trainer
    from tinygptv.train.recipe import load_recipe

    recipe = load_recipe(TINY, overrides(data, tmp_path / "run"))
    first = Trainer(recipe)
    first.train(max_steps=SAVE_EVERY)
    path = checkpoint_dir(tmp_path / "run", SAVE_EVERY) / STATE_NAME
    state = torch.load(path, weights_only=True)
    torch.save({**state, "optimizer": first.optimizer.state_dict()}, path)
    resumed = Trainer(recipe)
    assert resumed.step == SAVE_EVERY
    before, after = first.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert before["state"].keys() == after["state"].keys()
    for i, values in before["state"].items():
        assert all(torch.equal(values[k], after["state"][i][k]) for k in values)
    weights = dict(resumed.model.named_parameters())
    assert all(torch.equal(p, weights[n]) for n, p in first.model.named_parameters())


# --- the worker: what torchrun starts in each process -------------------------------------------------------------

def count_gradient_reductions(wrapped) -> list[int]:
    """A one-element counter of the collectives that reduce gradients: DDP's all-reduce (through its comm hook) or
    FSDP's reduce-scatter (through a counting copy of its default one)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    calls = [0]
    if isinstance(wrapped, DistributedDataParallel):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):
            calls[0] += 1
            return allreduce_hook(None, bucket)

        wrapped.register_comm_hook(None, hook)
        return calls
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

    class Counting(DefaultReduceScatter):
        def __call__(self, *args, **kwargs):
            calls[0] += 1
            return super().__call__(*args, **kwargs)

    counting = Counting()
    for module in wrapped.modules():
        if isinstance(module, FSDPModule):
            module.set_custom_reduce_scatter(counting)
    return calls


def describe_sharding(trainer) -> dict:
    """The FSDP units (by class) and how much of the frozen weights this process holds."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    units = sorted({type(m).__name__ for m in trainer.wrapped.modules() if isinstance(m, FSDPModule)})
    frozen = [p for p in trainer.model.parameters() if not p.requires_grad]
    held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in frozen)
    return {"units": units, "frozen_held": held, "frozen_total": sum(p.numel() for p in frozen)}


def kill_while_saving(step: int) -> None:
    """SIGKILL this process when the checkpoint of `step` has its weights written but not yet its trainer state."""
    from tinygptv.train import checkpointing

    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if isinstance(path, Path) and path.name == checkpointing.STATE_NAME and obj["step"] == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, path, *args, **kwargs)

    checkpointing.torch.save = save


def worker(argv: list[str]) -> None:
    import torch.distributed as dist

    from tinygptv.train.loop import Trainer
    from tinygptv.train.recipe import load_recipe

    # positional only: torchrun would take an option of ours for an abbreviation of one of its own
    parser = argparse.ArgumentParser()
    parser.add_argument("log", type=Path)
    parser.add_argument("kill_at_save", type=int, help="0: never")
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    # a collective that waits longer than this raises instead of hanging (the trainer reuses this process group)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    trainer = Trainer(load_recipe(args.recipe, args.overrides))
    calls = count_gradient_reductions(trainer.wrapped)
    sharding = describe_sharding(trainer)
    marks = []
    trainer.forward_pass.register_forward_pre_hook(
        lambda module, inputs: marks.append([calls[0], inputs[0].pixel_values is not None, inputs[0].any_image]))
    if args.kill_at_save and trainer.dist.is_main:
        kill_while_saving(args.kill_at_save)
    start = trainer.step
    trainer.train()
    args.log.mkdir(parents=True, exist_ok=True)
    log = {"start": start, "marks": marks, "node": os.environ.get("GROUP_RANK"), **sharding}
    (args.log / f"rank{trainer.dist.rank}.json").write_text(json.dumps(log))
    dist.destroy_process_group()


if __name__ == "__main__":
    worker(sys.argv[1:])
