# Timing and memory primitives for the bench workers (workload.py, reference.py, machine.py): warm-up then median of
# repeats, a streamer that stamps each generated token, and the peak memory of the whole worker process.
from __future__ import annotations

import statistics
import sys
import time
from typing import Callable

import torch


def sync(device: torch.device | str) -> None:
    """CUDA calls return before the work is done; a timer read without a sync measures the launch, not the work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_runs(fn: Callable[[], object], *, warmup: int, repeats: int, device: torch.device | str) -> list[float]:
    """Seconds per call for `repeats` timed calls after `warmup` untimed ones. First calls pay for lazy allocation,
    kernel selection and cold caches that later calls do not, so they run but are not counted."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    """The median, not the mean: our machines are shared and one slow run should not move the reported number."""
    return statistics.median(values)


class TokenTimer:
    """A transformers streamer that only records when each new token arrives. generate() puts the prompt ids first
    (an empty tensor when it is given embeddings), then one tensor per step, so the stamps give the time to the first
    token and every decode step without touching the generation loop."""

    def __init__(self) -> None:
        self.start = 0.0
        self.stamps: list[float] = []
        self._prompt_seen = False

    def begin(self) -> None:
        self.start = time.perf_counter()
        self.stamps = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    @property
    def first_token_s(self) -> float:
        return self.stamps[0] - self.start

    @property
    def step_times(self) -> list[float]:
        """Seconds of each decode step after the first token (the first token's time is the prefill's)."""
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far, loading included (ru_maxrss is KiB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def resident_split() -> dict:
    """Resident memory now, split into anonymous pages (the process's own: only swap could take them) and pages of
    mapped files (an engine maps its weight files: clean copies the kernel drops under memory pressure and reads
    again if they are touched). Linux only; empty elsewhere."""
    try:
        lines = open("/proc/self/status").read().splitlines()
    except OSError:
        return {}
    fields = {"RssAnon:": "rss_anon_bytes", "RssFile:": "rss_file_bytes"}
    return {fields[parts[0]]: int(parts[1]) * 1024 for parts in map(str.split, lines) if parts and parts[0] in fields}


def memory_report(device: torch.device | str) -> dict:
    out = {"peak_rss_bytes": peak_rss_bytes(), **resident_split()}
    if torch.device(device).type == "cuda":
        out["peak_vram_bytes"] = int(torch.cuda.max_memory_allocated())
    return out
