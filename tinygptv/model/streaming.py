# Streaming generation: the same TinyGPTV.generate run in a worker thread, its text handed out piece by piece as
# tokens arrive. Text that could be the start of a stop string is held back until it is known not to be one.
from __future__ import annotations

import threading
from typing import Callable, Iterator

from transformers import TextIteratorStreamer

from tinygptv.model.generation import GenerationSettings


class GenerationStopped(Exception):
    """Raised inside generate() (from the streamer) when the reader asked the stream to stop."""


class _StoppableStreamer(TextIteratorStreamer):
    """A TextIteratorStreamer whose producer ends early once stop() is called: generate() calls put() for every new
    token, so raising there ends the generation loop at the next token and frees the model."""

    def __init__(self, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.stopped = threading.Event()

    def put(self, value):
        if self.stopped.is_set():
            raise GenerationStopped
        super().put(value)

    def stop(self) -> None:
        self.stopped.set()


def stream_generate(model, pixel_values, prompt: str, settings: GenerationSettings | None = None, *,
                    image_embeds=None, on_text: Callable[[str], None] | None = None,
                    stopping_criteria=None) -> Iterator[str]:
    """Yield the answer to one prompt as it is generated; if on_text is given it is also called with each piece.
    The pieces join to exactly what generate() returns (before its final strip).

    Closing the iterator early (the reader breaks, is interrupted by Ctrl-C or its client disconnects) stops the
    generation at the next token and waits for the worker thread, so the model is free when this returns and no
    thread is left running inside it. stopping_criteria go to generate() as they are: they can end the answer at
    any token, even while no text is ready to hand out."""
    settings = settings or GenerationSettings()
    stops = settings.stops(model.config.prompt.end_sym)
    streamer = _StoppableStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure: list[BaseException] = []

    def work():
        try:
            model.generate(pixel_values, [prompt], image_embeds=image_embeds, settings=settings, streamer=streamer,
                           stopping_criteria=stopping_criteria)
        except GenerationStopped:
            pass
        except BaseException as e:  # re-raised in the caller's thread below
            failure.append(e)
        finally:
            streamer.end()

    worker = threading.Thread(target=work, daemon=True, name="tinygptv-generate")
    worker.start()
    holdback = max((len(s) for s in stops), default=1) - 1
    text, sent, stop_at = "", 0, -1
    try:
        for piece in streamer:
            text += piece
            stop_at = min((i for i in (text.find(s) for s in stops) if i != -1), default=-1)
            end = stop_at if stop_at != -1 else max(sent, len(text) - holdback)
            if end > sent:
                chunk, sent = text[sent:end], end
                if on_text:
                    on_text(chunk)
                yield chunk
            if stop_at != -1:
                break
    finally:
        streamer.stop()
        _join(worker)
    if failure:
        raise failure[0]
    if stop_at == -1 and len(text) > sent:
        if on_text:
            on_text(text[sent:])
        yield text[sent:]


def _join(worker: threading.Thread) -> None:
    """Wait for the generation thread; a second Ctrl-C while waiting must not leave it running in the model."""
    while worker.is_alive():
        try:
            worker.join()
        except KeyboardInterrupt:
            continue
