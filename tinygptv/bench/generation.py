# Fixed-length greedy generation and its timing, shared by the TinyGPT-V path (workload.py) and the stock
# reference (reference.py), so both decode the same number of steps and are summarised the same way.
from __future__ import annotations

import time
from typing import Callable

from tinygptv.bench.timing import TokenTimer, median, sync
from tinygptv.config import LLMConfig
from tinygptv.model.generation import GenerationSettings

WARMUP_TOKENS = 4  # a warm-up answer only needs to touch every kernel once, not to decode the full length


def fixed_length_kwargs(llm: LLMConfig, new_tokens: int) -> dict:
    """Greedy decoding of exactly `new_tokens`: min_new_tokens masks EOS until then, so random weights cannot end an
    answer early and every mode decodes the same number of steps. Stop strings are left out on purpose (they would
    still stop early); `ask` checks them once per step, a cost far below a decode step."""
    settings = GenerationSettings(max_new_tokens=new_tokens, min_new_tokens=new_tokens, stop_strings=())
    return settings.generate_kwargs(llm, tokenizer=None, end_sym="")


def time_first_answer(answer: Callable[[int, TokenTimer], object], *, new_tokens: int, device) -> dict:
    """The first whole answer after loading, timed before anything else runs: what a one-shot `ask` waits for after
    the load. It carries the one-time costs later answers do not (PyTorch and oneDNN pick and build their kernels;
    an engine's first-inference work, where OpenVINO rearranges its int4 weights, is done while loading)."""
    sync(device)
    start = time.perf_counter()
    answer(new_tokens, TokenTimer())
    sync(device)
    return {"first_answer_s": time.perf_counter() - start}


def time_answers(answer: Callable[[int, TokenTimer], object], *, new_tokens: int, warmup: int, repeats: int,
                 device) -> dict:
    """Run `answer(n, timer)` (one whole answer: encode, build the prompt, generate n tokens; it calls
    timer.begin() just before generate) `warmup` times with a few tokens, then `repeats` times in full. Decode speed
    of a run is (n - 1) steps over the time from the first token to the last, so the prefill is not in it."""
    timer = TokenTimer()
    for _ in range(warmup):
        answer(min(new_tokens, WARMUP_TOKENS), timer)
    e2e, rates, steps, first = [], [], [], []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        answer(new_tokens, timer)
        sync(device)
        e2e.append(time.perf_counter() - start)
        if len(timer.stamps) != new_tokens:
            raise RuntimeError(f"generate returned {len(timer.stamps)} new tokens, not the {new_tokens} asked for")
        step = timer.step_times
        rates.append(len(step) / sum(step))
        steps += step
        first.append(timer.first_token_s)
    return {
        "decode_tok_s": median(rates), "decode_runs_tok_s": rates, "decode_step_ms": median(steps) * 1e3,
        "first_token_s": median(first), "first_token_runs_s": first,
        "e2e_s": median(e2e), "e2e_runs_s": e2e, "new_tokens": new_tokens,
    }
