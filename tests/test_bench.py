# `tinygptv bench` on the tiny preset: one run through the command's entry point, with one job forced to fail, checks
# the behaviour that matters (a row per mode, sane numbers, a failure confined to its own row); the report's derived
# columns on a hand-worked row. Timings themselves are never asserted: they are what the bench reports.
from __future__ import annotations

import json
import math
import mmap
import sys

import pytest
import torch

from tinygptv.bench import runner
from tinygptv.bench.cost import encode_flops
from tinygptv.bench.report import derive
from tinygptv.bench.timing import resident_split
from tinygptv.cli import main
from tinygptv.config import preset
from tinygptv.model.tinygptv import TinyGPTV

BROKEN_MODEL = "no-such-folder/anywhere/model"
POSITIVE = ("load_s", "first_answer_s", "encode_s", "prefill_s", "prefill_tok_s", "decode_tok_s", "decode_step_ms",
            "first_token_s", "e2e_s", "weight_bytes_per_token", "peak_rss_bytes", "peak_rss_after_load_bytes",
            "achieved_gb_s", "bound_tok_s", "decode_fraction_of_bound", "encode_gflop", "encode_gflop_s",
            "encode_fraction", "encode_fraction_of_bf16_gemm", "speedup_decode", "speedup_prefill", "speedup_encode",
            "speedup_e2e")


@pytest.mark.slow
def test_bench_tiny_reports_every_mode_and_confines_a_failure(tmp_path, monkeypatch, capsys):
    plan = runner.plan_jobs

    def plan_with_a_broken_mode(settings):
        jobs = plan(settings)
        broken = dict(next(j for j in jobs if j["kind"] == "tinygptv"), mode="broken", model=BROKEN_MODEL)
        return jobs[:2] + [broken] + jobs[2:]  # after the first mode, so the modes after it must still run

    monkeypatch.setattr(runner, "plan_jobs", plan_with_a_broken_mode)
    out = tmp_path / "results" / "bench.json"
    code = main(["bench", "--preset", "tiny", "--quant", "none,bf16", "--prompt-tokens", "8", "--new-tokens", "4",
                     "--warmup", "1", "--repeats", "1", "--threads", "1", "--bandwidth-gib", "0.0625",
                     "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 1  # a job failed: the run says so, after writing everything else

    result = json.loads(out.read_text())
    assert result["schema"] == "tinygptv-bench/1"
    assert result["settings"]["quant"] == ["none", "bf16"]
    rows = {r["mode"]: r for r in result["rows"]}
    assert list(rows) == ["none", "broken", "bf16", "reference"]

    broken = rows.pop("broken")
    assert broken["ok"] is False and BROKEN_MODEL in broken["error"] and broken["returncode"] == 1
    assert f"broken: FAILED: {broken['error']}" in printed

    machine = result["machine"]
    assert machine["ok"] and machine["threads"] == 1
    bandwidth = machine["bandwidth"]["gb_s"]
    assert math.isfinite(bandwidth) and bandwidth > 0
    assert bandwidth == max(machine["bandwidth"]["methods_gb_s"].values())  # the roof is the fastest read seen
    assert all(machine["gemm"][d]["gflop_s"] > 0 for d in ("fp32", "bf16"))

    for mode, row in rows.items():
        assert row["ok"], row
        for key in POSITIVE:
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]) and row[key] > 0, (mode, key)
        assert row["threads"] == 1 and row["new_tokens"] == 4
        # every mode prefills the same sequence: BOS + 4 image embeddings + 8 text tokens
        assert row["prefill_tokens"] == 1 + 4 + 8
        assert mode in printed
    assert rows["reference"]["speedup_decode"] == 1.0
    assert rows["reference"]["llm_class"] == "PhiForCausalLM" and rows["reference"]["llm_dtype"] == "float32"
    assert (rows["none"]["encode_gemm"], rows["bf16"]["encode_gemm"]) == ("fp32", "bf16")


def test_derived_columns_on_a_hand_worked_row():
    """A 20 GB/s machine, 1 GB of weights per token: the bound is 20 tok/s, so 10 tok/s is half of it; 50 GFLOP/s of
    a 200 GFLOP/s bf16 GEMM is a quarter; twice the reference's decode and half its answer time are speed-ups of 2."""
    machine = {"ok": True, "bandwidth": {"gb_s": 20.0}, "gemm": {"fp32": {"gflop_s": 100.0}, "bf16": {"gflop_s": 200.0}}}
    row = {"ok": True, "kind": "tinygptv", "weight_bytes_per_token": 1e9, "decode_tok_s": 10.0, "prefill_tok_s": 300.0,
           "encode_gflop_s": 50.0, "vision_dtype": "bfloat16", "encode_s": 0.5, "e2e_s": 2.0}
    ref = {"ok": True, "kind": "reference", "weight_bytes_per_token": 4e9, "decode_tok_s": 5.0, "prefill_tok_s": 100.0,
           "encode_gflop_s": 40.0, "vision_dtype": "float32", "encode_s": 1.0, "e2e_s": 4.0}
    derive([row, ref], machine)
    assert row["bound_tok_s"] == 20.0 and row["decode_fraction_of_bound"] == 0.5 and row["achieved_gb_s"] == 10.0
    assert row["encode_gemm"] == "bf16" and row["encode_fraction"] == 0.25
    assert (row["speedup_decode"], row["speedup_prefill"], row["speedup_encode"], row["speedup_e2e"]) == (2, 3, 2, 2)
    assert ref["encode_gemm"] == "fp32" and ref["encode_fraction"] == 0.4 and ref["speedup_decode"] == 1.0
    derive([row], {"ok": False})  # no machine numbers: no fractions, never a made-up roof
    assert row["bound_tok_s"] is None and row["decode_fraction_of_bound"] is None and row["encode_fraction"] is None


def test_encode_flops_match_torch_flop_counter():
    """The analytic count (EVA ViT + Q-Former + projections) is the numerator of the encode fraction: it must equal
    what torch counts on the real forward. Run on the meta device, so the full-size model costs nothing."""
    from torch.utils.flop_counter import FlopCounterMode

    for name in ("tiny", "tinygptv-stage3"):
        config = preset(name)
        with torch.device("meta"):
            model = TinyGPTV(config).eval()
            pixels = torch.zeros(1, 3, config.vision.image_size, config.vision.image_size)
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            model.encode_image(pixels)
        tower = model.visual_encoder
        assert encode_flops(config, tower.num_tokens, tower.num_features) == counter.get_total_flops(), name


def test_a_killed_worker_is_named():
    assert "SIGKILL" in runner.exit_reason(-9) and "out-of-memory" in runner.exit_reason(-9)
    assert "status 3" in runner.exit_reason(3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status is Linux's")
def test_resident_split_counts_a_mapped_file_as_file_pages(tmp_path):
    """An engine's weight files are mapped: their pages must be reported apart from the process's own memory."""
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\1" * (64 << 20))
    before = resident_split()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert sum(mapped[i] for i in range(0, len(mapped), 4096)) == len(mapped) // 4096  # touch every page
        during = resident_split()
    assert during["rss_file_bytes"] - before["rss_file_bytes"] >= 60 << 20
    assert abs(during["rss_anon_bytes"] - before["rss_anon_bytes"]) < 32 << 20
