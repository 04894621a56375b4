# The one thread that owns the model in `tinygptv serve`: requests wait in a bounded queue and run one at a time, or,
# when several non-streaming ones share their settings, as one left-padded batch. Each run is bounded in time and
# stops early for a client that went away. Data path: prompt + pixels -> [queue -> encode_image -> generate /
# stream_generate] -> answer text, handed back through the job's callbacks.
from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from tinygptv.model.generation import GenerationSettings
from tinygptv.model.streaming import stream_generate


class QueueFull(Exception):
    pass


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int  # every position the LLM reads: BOS, text tokens and image query tokens
    completion_tokens: int  # the answer's tokens, counted by tokenising the returned text
    finish_reason: str  # "length" when the answer used all of max_new_tokens or the time limit, else "stop"


@dataclass(eq=False)
class Job:
    """One request. The callbacks run on the worker thread; they must hand the result over, not do work."""

    prompt: str
    pixels: torch.Tensor | None  # [1, 3, S, S], or None for a text-only conversation
    settings: GenerationSettings
    on_done: Callable[[Completion], None]
    on_error: Callable[[BaseException], None]
    on_text: Callable[[str], None] | None = None  # set: stream the answer piece by piece
    seed: int | None = None
    cancelled: bool = False  # the client went away: skip it if it has not started, stop generating if it has
    timed_out: bool = False  # set by the worker when the time limit cut the answer short

    def batch_key(self):
        """Jobs with equal keys can share one generate() call; streaming and seeded jobs run alone."""
        if self.on_text is not None or self.seed is not None:
            return None
        return self.settings


class GenerationWorker:
    """The model is not thread-safe (one KV cache, one RNG, CPU threads already busy), so exactly one thread runs it.
    Waiting non-streaming jobs with the same settings are batched up to max_batch (TinyGPTV.generate pads on the
    left, which gives the same greedy answers as one by one)."""

    def __init__(self, model, *, max_queue: int = 16, max_batch: int = 4, cached_images: int = 16,
                 time_limit: float | None = None):
        self.model = model
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.cached_images = cached_images
        self.time_limit = time_limit  # seconds one generate() call may run; the answer so far is returned
        self._embeddings: OrderedDict[str, torch.Tensor] = OrderedDict()  # sha256 of pixels -> [Q, D], LRU
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def queued(self) -> int:
        return len(self._jobs)

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="tinygptv-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the job in progress, then end; jobs still waiting fail."""
        with self._cond:
            self._stopping = True
            left, self._jobs = list(self._jobs), deque()
            self._cond.notify_all()
        for job in left:
            _call(job.on_error, RuntimeError("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(f"{len(self._jobs)} requests are already waiting (--queue-size {self.max_queue})")
            self._jobs.append(job)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                jobs = self._take()
            jobs = [job for job in jobs if not job.cancelled]
            if not jobs:
                continue
            try:
                if jobs[0].on_text is not None:
                    self._stream(jobs[0])
                else:
                    self._batch(jobs)
            except Exception as e:  # one bad request must not stop the server
                for job in jobs:
                    _call(job.on_error, e)

    def _take(self) -> list[Job]:
        """The oldest job, plus the waiting jobs it can share a batch with (they move ahead of the others)."""
        first = self._jobs.popleft()
        key = first.batch_key()
        if key is None or self.max_batch <= 1:
            return [first]
        batch = [first]
        for job in list(self._jobs):
            if len(batch) >= self.max_batch:
                break
            if job.batch_key() == key:
                self._jobs.remove(job)
                batch.append(job)
        return batch

    def _embed(self, job: Job) -> torch.Tensor | None:
        """The image's embeddings, from the cache when the same pixels came before: the API is stateless, so every
        turn of a conversation sends its image again, and encoding is the costliest step of a short CPU answer."""
        if job.pixels is None:
            return None
        key = hashlib.sha256(job.pixels.contiguous().numpy().tobytes()).hexdigest()
        if key in self._embeddings:
            self._embeddings.move_to_end(key)
            return self._embeddings[key]
        with torch.inference_mode():
            embed = self.model.encode_image(job.pixels)[0]  # [Q, D]
        self._embeddings[key] = embed
        if len(self._embeddings) > self.cached_images:
            self._embeddings.popitem(last=False)
        return embed

    def _stop_rows(self, jobs: list[Job]) -> StoppingCriteriaList:
        """Checked by generate() after every token: the time limit, and clients that have gone."""
        deadline = time.monotonic() + self.time_limit if self.time_limit is not None else float("inf")
        return StoppingCriteriaList([_StopRows(jobs, deadline, self.model.config.llm.pad_token_id)])

    def _batch(self, jobs: list[Job]) -> None:
        embeds = [self._embed(job) for job in jobs]
        if jobs[0].seed is not None:
            torch.manual_seed(jobs[0].seed)
        texts = self.model.generate(None, [job.prompt for job in jobs], image_embeds=embeds, settings=jobs[0].settings,
                                    stopping_criteria=self._stop_rows(jobs))
        for job, embed, text in zip(jobs, embeds, texts):
            _call(job.on_done, self._completion(job, embed, text))

    def _stream(self, job: Job) -> None:
        embed = self._embed(job)
        if job.seed is not None:
            torch.manual_seed(job.seed)
        strip = _Strip()
        pieces = []
        stream = stream_generate(self.model, None, job.prompt, job.settings, image_embeds=[embed],
                                 stopping_criteria=self._stop_rows([job]))
        with contextlib.closing(stream):  # however this ends, the generation thread has left the model
            for piece in stream:
                pieces.append(piece)
                text = strip.feed(piece)
                if text and not job.cancelled:
                    _call(job.on_text, text)
        _call(job.on_done, self._completion(job, embed, "".join(pieces).strip()))

    def _completion(self, job: Job, embed: torch.Tensor | None, text: str) -> Completion:
        prompt_tokens = self.model.prompt_tokens(job.prompt, None if embed is None else embed.shape[0])
        answer_tokens = len(self.model.tokenize(text)) if text else 0
        length = answer_tokens >= job.settings.max_new_tokens or job.timed_out
        return Completion(text, prompt_tokens, answer_tokens, "length" if length else "stop")


class _StopRows(StoppingCriteria):
    """Ends the rows of a batch whose client has gone, and every row once the time limit has passed, marking the jobs
    still generating then as timed out (a finished row only grows padding). Checked by generate() after each new
    token; with beam search each job owns num_beams consecutive rows."""

    def __init__(self, jobs: Sequence[Job], deadline: float, pad_id: int):
        self.jobs, self.deadline, self.pad_id = jobs, deadline, pad_id

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:  # input_ids [B * beams, L]
        per_job = input_ids.shape[0] // len(self.jobs)
        late = time.monotonic() > self.deadline
        if late:
            for k, job in enumerate(self.jobs):
                job.timed_out = job.timed_out or int(input_ids[k * per_job, -1]) != self.pad_id
        done = torch.tensor([late or job.cancelled for job in self.jobs], device=input_ids.device)
        return done.repeat_interleave(per_job)  # [B * beams]


class _Strip:
    """Streams what str.strip() keeps of the whole answer: leading white space is dropped, trailing white space is
    held back until more text follows it, so the streamed pieces join to exactly the non-streaming answer."""

    def __init__(self):
        self.started = False
        self.pending = ""

    def feed(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self.started = True
        text = self.pending + piece
        body = text.rstrip()
        self.pending = text[len(body):]
        return body


def _call(callback, value) -> None:
    """Hand a result over; a client that has gone (its event loop closed) must not take the worker down."""
    try:
        callback(value)
    except Exception:
        pass
