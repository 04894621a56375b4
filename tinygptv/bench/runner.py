# Runs the bench's jobs one after another, each in its own worker process (worker.py), and turns whatever happened
# (a result, an exception, an out-of-memory kill, a timeout) into one row. Called by cli.py; rows go to report.py.
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tinygptv.bench.worker import MARKER
from tinygptv.engine.backends import ENGINE_MODES, TORCH

STDERR_TAIL_LINES = 30
FIRST_LOAD_FIELDS = ("converted", "load_s", "peak_rss_bytes")  # an engine's first load, reported in its mode's row


@dataclass
class Settings:
    model: str
    quant: list[str]
    image_size: int | None = None
    image: str | None = None
    prompt_tokens: int = 64
    new_tokens: int = 20
    warmup: int = 1
    repeats: int = 3
    threads: int | None = None
    device: str = "cpu"
    reference: bool = True
    bandwidth_gib: float = 1.0
    timeout_s: float = 3600.0
    backend: list[str] = field(default_factory=lambda: [TORCH])
    engine_quant: list[str] | None = None  # the engines' modes when --quant was not given (else `quant`)

    def to_dict(self) -> dict:
        return asdict(self)


def row_label(backend: str, quant: str) -> str:
    """A row's `mode`: the --quant mode for PyTorch (as before engines existed), backend:mode for an engine."""
    return quant if backend == TORCH else f"{backend}:{quant}"


def backend_modes(s: Settings, backend: str) -> list[str]:
    """The --quant modes of the run that `backend` runs (an engine runs fewer than PyTorch)."""
    if backend == TORCH:
        return list(s.quant)
    return [q for q in (s.engine_quant or s.quant) if q in ENGINE_MODES[backend]]


def plan_jobs(s: Settings) -> list[dict]:
    """Machine roofs first, then each precision of each backend, then the stock reference. An engine's mode is first
    loaded once in a job of its own (`first-load`: the conversion when it is not cached yet), so its measured row
    loads as every later run does, and the conversion's time and memory are reported beside it. Jobs run one at a
    time: two at once would share the memory bus and the cores they are trying to measure."""
    common = dict(model=s.model, image_size=s.image_size, image=s.image, prompt_tokens=s.prompt_tokens,
                  new_tokens=s.new_tokens, warmup=s.warmup, repeats=s.repeats, threads=s.threads, device=s.device)
    jobs = [dict(kind="machine", mode="machine", device=s.device, threads=s.threads, bandwidth_gib=s.bandwidth_gib)]
    for backend in s.backend:
        for q in backend_modes(s, backend):
            mode = row_label(backend, q)
            if backend != TORCH:
                jobs.append(dict(common, kind="first-load", mode=f"{mode} first load", quant=q, backend=backend))
            jobs.append(dict(common, kind="tinygptv", mode=mode, quant=q, backend=backend))
    if s.reference:
        jobs.append(dict(common, kind="reference", mode="reference"))
    return jobs


def worker_env(threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    package_root = str(Path(__file__).resolve().parents[2])  # the folder holding tinygptv/, wherever it is
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def _pump(stream, prefix: str, tail: collections.deque) -> None:
    for line in stream:
        line = line.rstrip("\n")
        tail.append(line)
        print(f"{prefix}{line}", file=sys.stderr, flush=True)


def run_worker(job: dict, *, timeout_s: float) -> dict:
    """Run one job and return its row; never raises for the job's own failure. Worker stderr is forwarded live
    (prefixed with the mode) so a user sees progress, and its tail is kept for the row of a failed job."""
    cmd = [sys.executable, "-m", "tinygptv.bench.worker", json.dumps(job)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=worker_env(job.get("threads")))
    tail: collections.deque = collections.deque(maxlen=STDERR_TAIL_LINES)
    out: list[str] = []
    pumps = [threading.Thread(target=_pump, args=(proc.stderr, f"  [{job['mode']}] ", tail), daemon=True),
             threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)]
    for t in pumps:
        t.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        proc.wait()
    for t in pumps:
        t.join(timeout=10)
    result = None
    for line in reversed(out):
        if line.startswith(MARKER):
            result = json.loads(line[len(MARKER):])
            break
    if result is not None and result.get("ok") and proc.returncode == 0:
        return result
    row = {"kind": job["kind"], "mode": job["mode"], "ok": False, "returncode": proc.returncode,
           "stderr_tail": "\n".join(tail)}
    if timed_out:
        row["error"] = f"timed out after {timeout_s:g} s"
    elif result is not None and result.get("error"):
        row["error"] = result["error"]
        row["traceback"] = result.get("traceback")
    else:
        row["error"] = exit_reason(proc.returncode)
    return row


def exit_reason(returncode: int) -> str:
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (the kernel's out-of-memory killer sends this)" if -returncode == signal.SIGKILL else ""
        return f"worker killed by {name}{hint}"
    return f"worker exited with status {returncode} without a result"


def run_jobs(jobs: list[dict], *, timeout_s: float, log, on_row=None) -> list[dict]:
    """on_row(rows so far) after each job, so results already measured survive a bench that is stopped."""
    rows = []
    first_load = None
    for i, job in enumerate(jobs, 1):
        log(f"bench: [{i}/{len(jobs)}] {job['mode']}")
        row = run_worker(job, timeout_s=timeout_s)
        if not row.get("ok"):
            log(f"bench: {job['mode']} FAILED: {row['error']}")
        if job["kind"] == "first-load":  # reported in the row of the mode it prepared, or as a failure of its own
            first_load = row
            if row.get("ok"):
                continue
        elif first_load is not None and row.get("ok"):
            row["first_load"] = {k: first_load[k] for k in FIRST_LOAD_FIELDS}
            first_load = None
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    return rows

