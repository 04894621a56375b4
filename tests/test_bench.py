# `tinygptv bench` on the tiny preset: one run through the command's entry point, with one job forced to fail, checks
# the behaviour that matters (a row per mode, sane numbers, fractions that follow from the reported numbers, a
# failure confined to its own row). Timings themselves are never asserted: they are what the bench reports.
from __future__ import annotations

import json
import math

import torch

from tinygptv.bench import cli, runner
from tinygptv.bench.cost import encode_flops
from tinygptv.config import preset
from tinygptv.model.tinygptv import TinyGPTV

BROKEN_MODEL = "no-such-folder/anywhere/model"
POSITIVE = ("load_s", "encode_s", "prefill_s", "prefill_tok_s", "decode_tok_s", "decode_step_ms", "first_token_s",
            "e2e_s", "weight_bytes_per_token", "peak_rss_bytes", "peak_rss_after_load_bytes", "achieved_gb_s",
            "bound_tok_s", "decode_fraction_of_bound", "encode_gflop", "encode_gflop_s", "encode_fraction",
            "encode_fraction_of_bf16_gemm", "speedup_decode", "speedup_prefill", "speedup_encode", "speedup_e2e")


def test_bench_tiny_reports_every_mode_and_confines_a_failure(tmp_path, monkeypatch, capsys):
    plan = runner.plan_jobs

    def plan_with_a_broken_mode(settings):
        jobs = plan(settings)
        broken = dict(next(j for j in jobs if j["kind"] == "tinygptv"), mode="broken", model=BROKEN_MODEL)
        return jobs[:2] + [broken] + jobs[2:]  # after the first mode, so the modes after it must still run

    monkeypatch.setattr(runner, "plan_jobs", plan_with_a_broken_mode)
    out = tmp_path / "results" / "bench.json"
    code = cli.main(["--preset", "tiny", "--quant", "none,bf16", "--prompt-tokens", "8", "--new-tokens", "4",
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
        # the derived numbers follow from the reported ones, so a reader can redo them
        assert math.isclose(row["decode_fraction_of_bound"],
                            row["decode_tok_s"] * row["weight_bytes_per_token"] / (bandwidth * 1e9), rel_tol=1e-9)
        assert math.isclose(row["bound_tok_s"] * row["decode_fraction_of_bound"], row["decode_tok_s"], rel_tol=1e-9)
        gemm = machine["gemm"][row["encode_gemm"]]["gflop_s"]
        assert math.isclose(row["encode_fraction"], row["encode_gflop_s"] / gemm, rel_tol=1e-9)
        assert math.isclose(row["speedup_decode"], row["decode_tok_s"] / rows["reference"]["decode_tok_s"],
                            rel_tol=1e-9)
        assert mode in printed
    assert rows["reference"]["speedup_decode"] == 1.0
    assert rows["reference"]["llm_class"] == "PhiForCausalLM" and rows["reference"]["llm_dtype"] == "float32"
    assert (rows["none"]["encode_gemm"], rows["bf16"]["encode_gemm"]) == ("fp32", "bf16")


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
