# The one thread that owns the model in `tinygptv serve`: requests wait in a bounded queue and run one at a time, or,
# when several non-streaming ones share their settings, as one left-padded batch. Data path: prompt + pixels ->
# [queue -> encode_image -> generate / stream_generate] -> answer text, handed back through the job's callbacks.
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable

import torch

from tinygptv.data.templates import IMAGE_PLACEHOLDER
from tinygptv.model.generation import GenerationSettings
from tinygptv.model.streaming import stream_generate


class QueueFull(Exception):
    pass


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int  # every position the LLM reads: BOS, text tokens and image query tokens
    completion_tokens: int  # the answer's tokens, counted by tokenising the returned text
    finish_reason: str  # "length" when the answer used all of max_new_tokens, else "stop"


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
    cancelled: bool = False  # the client went away: skip it if it has not started, stop sending if it has

    def batch_key(self):
        """Jobs with equal keys can share one generate() call; streaming and seeded jobs run alone."""
        if self.on_text is not None or self.seed is not None:
            return None
        return self.settings


class GenerationWorker:
    """The model is not thread-safe (one KV cache, one RNG, CPU threads already busy), so exactly one thread runs it.
    Waiting non-streaming jobs with the same settings are batched up to max_batch (TinyGPTV.generate pads on the
    left, which gives the same greedy answers as one by one)."""

    def __init__(self, model, *, max_queue: int = 16, max_batch: int = 4, cached_images: int = 16):
        self.model = model
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.cached_images = cached_images
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

    def _batch(self, jobs: list[Job]) -> None:
        embeds = [self._embed(job) for job in jobs]
        if jobs[0].seed is not None:
            torch.manual_seed(jobs[0].seed)
        texts = self.model.generate(None, [job.prompt for job in jobs], image_embeds=embeds, settings=jobs[0].settings)
        for job, embed, text in zip(jobs, embeds, texts):
            _call(job.on_done, self._completion(job, embed, text))

    def _stream(self, job: Job) -> None:
        embed = self._embed(job)
        if job.seed is not None:
            torch.manual_seed(job.seed)
        strip = _Strip()
        pieces = []
        # stream_generate must be read to the end even if the client has gone: its generation thread would otherwise
        # still be using the model when the next job starts.
        for piece in stream_generate(self.model, None, job.prompt, job.settings, image_embeds=[embed]):
            pieces.append(piece)
            text = strip.feed(piece)
            if text and not job.cancelled:
                _call(job.on_text, text)
        _call(job.on_done, self._completion(job, embed, "".join(pieces).strip()))

    def _completion(self, job: Job, embed: torch.Tensor | None, text: str) -> Completion:
        pieces = job.prompt.split(IMAGE_PLACEHOLDER)
        prompt_tokens = sum(len(self.model.tokenize(p)) for p in pieces if p)
        prompt_tokens += int(self.model.config.prompt.bos_at_inference)
        prompt_tokens += 0 if embed is None else embed.shape[0] * (len(pieces) - 1)
        answer_tokens = len(self.model.tokenize(text)) if text else 0
        length = answer_tokens >= job.settings.max_new_tokens
        return Completion(text, prompt_tokens, answer_tokens, "length" if length else "stop")


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
