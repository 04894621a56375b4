# How an answer is decoded, in one place for every caller (ask/chat, serve, demo, eval, bench): the settings, their
# checks, the keyword arguments they become for transformers' generate(), stop-string handling, and the checks of
# what a prompt may be (its length, valid text).
# Data path: spliced prompt embeddings -> [these settings] -> LLM.generate -> tokens -> text cut at the stop string.
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

MAX_BEAMS = 16  # beam search keeps this many KV caches; more is a typo, not a setting


@dataclass(frozen=True)
class GenerationSettings:
    """Greedy by default; temperature > 0 samples (with top_p); num_beams > 1 runs beam search. stop_strings None
    means the model's own end_sym; every answer is cut at the first stop string found."""

    max_new_tokens: int = 300
    temperature: float = 0.0
    top_p: float = 0.9
    num_beams: int = 1
    repetition_penalty: float = 1.0
    stop_strings: tuple[str, ...] | None = None
    min_new_tokens: int = 0  # end-of-text is masked until then (the bench decodes an exact number of tokens)
    max_repeats: int = 0  # stop an answer repeating one phrase this many times in a row (model/stopping.py); 0: off

    def __post_init__(self):
        if self.stop_strings is not None and not isinstance(self.stop_strings, tuple):
            if isinstance(self.stop_strings, str):
                raise ValueError("stop_strings must be a list of strings, not one string")
            object.__setattr__(self, "stop_strings", tuple(self.stop_strings))  # hashable: batches key on settings
        self._check()

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def replace(self, **changes) -> "GenerationSettings":
        return dataclasses.replace(self, **changes)

    def _check(self) -> None:
        """Every field in range, else ValueError naming the field (`ask --top-p 7` fails here, before any work)."""
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("max_new_tokens", "num_beams", "min_new_tokens", "max_repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 1 <= self.num_beams <= MAX_BEAMS:
            raise ValueError(f"num_beams must be in [1, {MAX_BEAMS}], got {self.num_beams}")
        if self.max_repeats == 1 or self.max_repeats < 0:
            raise ValueError(f"max_repeats must be 0 (off) or at least 2, got {self.max_repeats}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = none), got {self.repetition_penalty}")
        if self.stop_strings is not None and not all(isinstance(s, str) for s in self.stop_strings):
            raise ValueError("stop_strings must be strings")

    def stops(self, end_sym: str) -> list[str]:
        """The stop strings in force: the given ones or end_sym; whitespace-only ones are dropped (transformers cannot
        stop on them and a streamed answer would hold text back for nothing)."""
        stops = self.stop_strings if self.stop_strings is not None else (end_sym,)
        return [s for s in stops if s.strip()]

    def generate_kwargs(self, llm, tokenizer, end_sym: str) -> dict:
        """Keyword arguments for transformers' generate() (llm: the model's LLMConfig, for the special token ids)."""
        kwargs = dict(
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens or None,
            do_sample=self.sampling,
            num_beams=self.num_beams,
            repetition_penalty=self.repetition_penalty,
            pad_token_id=llm.pad_token_id,
            eos_token_id=llm.eos_token_id,
            bos_token_id=llm.bos_token_id,
        )
        if self.sampling:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=None)
        else:  # unset, so the LLM's own generation_config defaults (a top_k of 50, say) cannot switch anything on
            kwargs.update(temperature=None, top_p=None, top_k=None)
        stops = self.stops(end_sym)
        if stops:
            kwargs.update(stop_strings=stops, tokenizer=tokenizer)
        return kwargs


class PromptTooLong(ValueError):
    """A prompt longer than the model may read with room for its answer, refused before any model work (the LLM's
    cost grows with the prompt, and past its context it answers nonsense). Callers add how to change the limit."""

    def __init__(self, tokens: int | None, allowed: int, context: int, max_new_tokens: int, limit: int | None):
        self.tokens, self.allowed = tokens, allowed
        count = f"{tokens} tokens" if tokens is not None else f"far more than {allowed} tokens (not even counted)"
        if allowed <= 0:
            why = f"max_new_tokens {max_new_tokens} leaves no room in this model's context of {context} tokens"
        elif limit is not None and limit == allowed:
            why = f"the limit is {limit} prompt tokens"
        else:
            why = f"this model's context of {context} tokens less max_new_tokens {max_new_tokens} leaves {allowed}"
        super().__init__(f"the prompt is {count}: too long ({why})")


def check_utf8(text: str, what: str) -> None:
    """ValueError naming `what` ("the question") when `text` cannot be written as UTF-8 (utf8_problem says where)."""
    problem = utf8_problem(text)
    if problem:
        raise ValueError(f"{what} is not valid UTF-8 ({problem})")


def utf8_problem(text: str) -> str | None:
    """Why `text` cannot be written as UTF-8, or None. Bytes that were not UTF-8 reach Python as lone surrogates
    (command-line arguments and stdin decode them with surrogateescape: byte 0xff becomes U+DCFF; JSON can spell
    one as \\udcff); the tokenizer cannot take them."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        if 0xDC80 <= code <= 0xDCFF:
            return f"byte 0x{code - 0xDC00:02x} at character {e.start}"
        return f"lone surrogate U+{code:04X} at character {e.start}"


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string (generation stops at the token that completes one, so
    the decoded text can carry it and whatever the same token added)."""
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]
