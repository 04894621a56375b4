# HTTP face of `tinygptv serve`: OpenAI's POST /v1/chat/completions (whole or as server-sent events), GET /v1/models and
# GET /health. Data path: HTTP JSON -> openai_schema (prompt + image) -> worker (the model) -> OpenAI-shaped JSON.
# Every request's work is bounded before it reaches the model: body size and read time, prompt tokens, image pixels,
# answer tokens and generation time; a client that goes away stops its generation.
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinygptv.data.image_file import ImageError, ImageTooLarge
from tinygptv.data.image_processor import ImageProcessor
from tinygptv.model.generation import GenerationSettings, PromptTooLong
from tinygptv.serve.openai_schema import APIError, ChatRequest, Limits, build_prompt, parse_chat_request, parse_json
from tinygptv.serve.worker import Completion, GenerationWorker, Job, QueueFull

# Requests parsed, tokenized and image-decoded at the same time (in worker threads): a few keep the model's queue fed;
# more would only add decoded images in memory (up to 150 MB each at the pixel limit) and CPU taken from generation.
PREPARE_SLOTS = 4


@dataclass
class ServeSettings:
    """Everything the app needs besides the model; `tinygptv serve` fills it from its flags."""

    model_id: str
    template: str  # the prompt template's name
    aliases: tuple[str, ...] = ()  # other model names a request may use for this model
    api_key: str | None = None
    task: str | None = None  # a stage-4 task tag put before every user message, as `tinygptv chat --task`
    max_body_bytes: int = 20 * 2**20
    limits: Limits = field(default_factory=Limits)
    # decoding for what a request leaves out (temperature 0: greedy); num_beams and repetition_penalty are the
    # server's alone (OpenAI's API has no field for them)
    defaults: GenerationSettings = field(default_factory=GenerationSettings)
    queue_size: int = 16
    max_batch: int = 4
    time_limit: float | None = 300.0  # seconds of generation per request; the answer so far ends with "length"
    body_timeout: float = 60.0  # seconds a client may take to send its request body (408 after)


def create_app(model, settings: ServeSettings) -> FastAPI:
    """The app owns one GenerationWorker, started and stopped with the server."""
    worker = GenerationWorker(model, max_queue=settings.queue_size, max_batch=settings.max_batch,
                              time_limit=settings.time_limit)
    processor = ImageProcessor(model.config.vision, max_pixels=settings.limits.max_image_pixels)
    prepare_slots = asyncio.Semaphore(PREPARE_SLOTS)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop(timeout=60)

    app = FastAPI(title="tinygptv", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings, app.state.worker = settings, worker

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(APIError(e.status_code, message).body(), status_code=e.status_code)

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def model_card() -> dict:
        return {"id": settings.model_id, "object": "model", "created": created, "owned_by": "tinygptv"}

    @app.get("/health")
    @app.get("/v1/health")
    async def health():
        return {"status": "ok", "model": settings.model_id, "queued": worker.queued}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str, request: Request):
        check_key(request)
        _check_model(name, settings)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        try:
            raw = await asyncio.wait_for(_read_body(request, settings.max_body_bytes), settings.body_timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {settings.body_timeout:g} s",
                           code="request_timeout") from None
        # parsing, tokenizing and decoding an image take time: off the event loop, which serves everyone
        async with prepare_slots:
            chat, prompt, pixels, generation = await run_in_threadpool(_prepare, raw, settings, model, processor)
        job = Job(prompt, pixels, generation, seed=chat.seed, on_done=None, on_error=None)
        if chat.stream:
            if settings.defaults.num_beams > 1:
                raise APIError(400, f"this server runs beam search (--num-beams {settings.defaults.num_beams}), "
                                    "which cannot stream; send stream=false", param="stream")
            return _stream(job, chat, worker, settings)
        return await _complete(job, worker, settings, request)

    return app


def _check_model(name: str, settings: ServeSettings) -> None:
    if name != settings.model_id and name not in settings.aliases:
        raise APIError(404, f"the model {name!r} does not exist here; this server runs {settings.model_id!r}",
                       param="model", code="model_not_found")


async def _read_body(request: Request, limit: int) -> bytes:
    """Refuse an oversized body from its Content-Length, or as soon as it grows past the limit, without keeping it."""
    too_large = APIError(413, f"the request body is larger than this server's limit of {limit / 2**20:g} MB "
                              "(--max-body-mb)", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _prepare(raw: bytes, settings: ServeSettings, model, processor: ImageProcessor):
    """Body -> checked request, prompt, pixels and decoding settings; every problem is a 4xx naming the field. The
    prompt's length is checked before the image is decoded: the cheaper refusal first."""
    body = parse_json(raw)
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        _check_model(body["model"], settings)
    chat = parse_chat_request(body, settings.limits)
    prompt = build_prompt(chat, settings.template, model.config.prompt.end_sym, settings.task)
    generation = _generate_settings(chat, settings, model)
    try:
        model.check_prompt_length(prompt, chat.max_tokens, settings.limits.max_prompt_tokens)
    except PromptTooLong as e:
        raise APIError(400, f"{e}; send a shorter conversation or a smaller max_tokens (the server's limit: "
                            "--max-prompt-tokens)", param="messages", code="context_length_exceeded") from None
    pixels = None
    if chat.image is not None:
        try:
            pixels = processor(processor.open(chat.image, name=chat.image_param))  # [1, 3, S, S]
        except ImageTooLarge as e:
            raise APIError(400, f"{e} (--max-image-megapixels)", param=chat.image_param,
                           code="image_too_large") from None
        except (ImageError, OSError) as e:
            raise APIError(400, str(e), param=chat.image_param, code="invalid_image") from None
    return chat, prompt, pixels, generation


def _generate_settings(chat: ChatRequest, settings: ServeSettings, model) -> GenerationSettings:
    changes = dict(max_new_tokens=chat.max_tokens, stop_strings=(model.config.prompt.end_sym, *chat.stop))
    if chat.temperature is not None:
        changes["temperature"] = chat.temperature
    if chat.top_p is not None:
        changes["top_p"] = chat.top_p
    try:
        return settings.defaults.replace(**changes)
    except ValueError as e:  # the schema checks every field first; this is the last line of defence
        raise APIError(400, str(e)) from None


def _submit(job: Job, worker: GenerationWorker) -> None:
    try:
        worker.submit(job)
    except QueueFull as e:
        raise APIError(503, f"the server is busy: {e}; retry shortly", type="server_error",
                       code="server_overloaded") from None
    except RuntimeError as e:
        raise APIError(503, str(e), type="server_error", code="server_unavailable") from None


def _failure(e: BaseException) -> APIError:
    return APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error", code="generation_failed")


async def _complete(job: Job, worker: GenerationWorker, settings: ServeSettings, request: Request) -> dict:
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(method, value):
        if not future.done():
            getattr(future, method)(value)

    job.on_done = lambda result: loop.call_soon_threadsafe(settle, "set_result", result)
    job.on_error = lambda e: loop.call_soon_threadsafe(settle, "set_exception", _failure(e))
    _submit(job, worker)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({future, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        # no-op once done; if the client left, the worker skips the job or stops its generation at the next token
        job.cancelled = True
    if not future.done():
        raise APIError(499, "the client closed the connection", code="client_closed_request")
    result: Completion = future.result()
    return {
        "id": _completion_id(), "object": "chat.completion", "created": int(time.time()), "model": settings.model_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "finish_reason": result.finish_reason, "logprobs": None}],
        "usage": _usage(result),
    }


async def _disconnected(request: Request) -> None:
    """Returns when the client has closed the connection. The body has been read, so the next ASGI message is the
    disconnect (sent early by a client that gave up, or at the end when the response is done)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _stream(job: Job, chat: ChatRequest, worker: GenerationWorker, settings: ServeSettings) -> StreamingResponse:
    """Server-sent events as OpenAI sends them: a chunk with the role, one per piece of text, one with the
    finish_reason (and, with stream_options.include_usage, one with the usage), then [DONE]. A client that
    disconnects cancels the response's task; the `finally` below then stops the generation."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job.on_text = lambda text: loop.call_soon_threadsafe(events.put_nowait, ("text", text))
    job.on_done = lambda result: loop.call_soon_threadsafe(events.put_nowait, ("done", result))
    job.on_error = lambda e: loop.call_soon_threadsafe(events.put_nowait, ("error", e))
    _submit(job, worker)  # before the response starts, so a full queue is still an HTTP 503
    cid, created = _completion_id(), int(time.time())

    def chunk(delta: dict, finish_reason=None, choices=True) -> dict:
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": settings.model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
                if choices else []}

    async def sse():
        try:
            yield _event(chunk({"role": "assistant", "content": ""}))
            while True:
                kind, value = await events.get()
                if kind == "text":
                    yield _event(chunk({"content": value}))
                elif kind == "done":
                    yield _event(chunk({}, value.finish_reason))
                    if chat.include_usage:
                        yield _event({**chunk({}, choices=False), "usage": _usage(value)})
                    break
                else:
                    yield _event(_failure(value).body())
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _usage(result: Completion) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}
