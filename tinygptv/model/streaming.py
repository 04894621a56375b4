# Streaming generation: the same TinyGPTV.generate run in a worker thread, its text handed out piece by piece as
# tokens arrive. Text that could be the start of a stop string is held back until it is known not to be one.
from __future__ import annotations

import threading
from typing import Callable, Iterator, Sequence

from transformers import TextIteratorStreamer


def stream_generate(model, pixel_values, prompt: str, *, on_text: Callable[[str], None] | None = None,
                    stop_strings: Sequence[str] | None = None, **generate_kwargs) -> Iterator[str]:
    """Yield the answer to one prompt as it is generated; if on_text is given it is also called with each piece.
    The pieces join to exactly what generate() returns (before its final strip)."""
    stops = [s for s in (stop_strings if stop_strings is not None else [model.config.prompt.end_sym]) if s.strip()]
    streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure: list[BaseException] = []

    def work():
        try:
            model.generate(pixel_values, [prompt], streamer=streamer, stop_strings=stops, **generate_kwargs)
        except BaseException as e:  # re-raised in the caller's thread below
            failure.append(e)
            streamer.end()

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    holdback = max((len(s) for s in stops), default=1) - 1
    text, sent = "", 0
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
    else:
        stop_at = -1
    worker.join()
    if failure:
        raise failure[0]
    if stop_at == -1 and len(text) > sent:
        if on_text:
            on_text(text[sent:])
        yield text[sent:]
