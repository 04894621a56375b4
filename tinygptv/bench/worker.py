# One bench job in its own process (`python -m tinygptv.bench.worker '<job JSON>'`), started by runner.py: the
# machine roofs, one precision of the model (or an engine's first load, which converts), or the stock reference.
# Prints exactly one marked JSON line on stdout.
"""Each job runs in a fresh process so that its peak RSS (ru_maxrss) is the peak of that precision alone, loading
included, and so that a crash or an out-of-memory kill costs one row, not the whole bench. Progress and anything
the libraries print go to stderr; stdout carries only the result line."""
from __future__ import annotations

import contextlib
import json
import sys
import traceback

MARKER = "TINYGPTV-BENCH-RESULT "


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_job(job: dict) -> dict:
    import torch

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda, but torch sees no CUDA device")
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    kind = job["kind"]
    if kind == "machine":
        from tinygptv.bench.machine import measure_machine
        from tinygptv.bench.timing import memory_report

        return {**measure_machine(device, job["bandwidth_gib"], log), **memory_report(device)}
    if kind == "first-load":
        from tinygptv.bench.workload import first_load

        return first_load(job, log)
    if kind == "tinygptv":
        from tinygptv.bench.workload import measure_tinygptv

        return {**measure_tinygptv(job, log), "threads": torch.get_num_threads()}
    if kind == "reference":
        from tinygptv.bench.reference import measure_reference

        return {**measure_reference(job, log), "threads": torch.get_num_threads()}
    raise ValueError(f"unknown bench job kind {kind!r}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(argv[0])
    result_stream = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            row = {**run_job(job), "ok": True}
        code = 0
    except Exception as e:  # reported as this job's row; the parent goes on with the next job
        tb = traceback.format_exc()
        log(tb)
        row = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": tb[-4000:]}
        code = 1
    row = {"kind": job["kind"], "mode": job["mode"], **row}
    print(MARKER + json.dumps(row), file=result_stream, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
