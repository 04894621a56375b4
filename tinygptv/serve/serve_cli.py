# `tinygptv serve`, registered into the main parser by tinygptv/cli.py: the OpenAI-compatible HTTP server.
# Data path: --model -> load_model -> worker thread; HTTP clients -> openai_api -> worker -> answers.
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from tinygptv.cli_options import (
    add_input_limit_args, add_model_args, examples, generation_settings, input_limits, load_for_args,
)
from tinygptv.data.templates import inference_template

API_KEY_ENV = "TINYGPTV_API_KEY"


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add `serve` to the main parser's sub-parsers."""
    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible chat-completions server (POST /v1/chat/completions)",
        description="Serve a model over HTTP with OpenAI's chat-completions API, so the official `openai` client "
                    "and tools built on it can talk to it (base_url http://HOST:PORT/v1). An image is sent as a "
                    "data: URL (base64 PNG/JPEG) in an image_url content part; one image per conversation. One "
                    "thread runs the model; concurrent requests wait in a queue, and waiting non-streaming requests "
                    "with equal settings run as one batch. --max-new-tokens, --temperature and --top-p are the "
                    "defaults for requests that leave them out (temperature 0 or unset: greedy). Every request is "
                    "bounded: body size, prompt tokens, image pixels, max_tokens and generation time, each a flag "
                    "below; a client that disconnects stops its generation. docs/serve.md has curl and Python "
                    "examples and the limits.",
        **examples("tinygptv serve                      # the bundled model on http://127.0.0.1:8000/v1",
                   "tinygptv serve --model tinygptv-stage3 --quant int8 --api-key secret --port 8080"))
    add_model_args(p)
    add_input_limit_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for every interface, "
                        "then set --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--served-model-name", metavar="ID",
                   help="the model id clients see in /v1/models and send as `model` (default: the --model name, or "
                        "a model folder's name)")
    p.add_argument("--model-alias", metavar="NAME", action="append", default=[],
                   help="another `model` value to accept for this model, e.g. gpt-4o-mini for a client that insists "
                        "on one (repeatable); any other value is a 404 model_not_found")
    p.add_argument("--api-key", metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV}; unset = open)")
    p.add_argument("--allow-local-files", metavar="DIR", type=Path,
                   help="also accept file:// image URLs, for files inside DIR only (default: refused)")
    p.add_argument("--max-body-mb", type=float, default=20.0,
                   help="largest request body, in MB (default 20; 413 above)")
    p.add_argument("--max-tokens-limit", type=int, default=1024,
                   help="largest max_tokens a request may ask for; above it the request is refused with 400, not "
                        "clamped (default 1024)")
    p.add_argument("--request-timeout", type=float, default=300.0, metavar="S",
                   help="seconds one request may generate; the answer so far is returned with finish_reason "
                        "\"length\" (default 300; 0 = no limit)")
    p.add_argument("--queue-size", type=int, default=16,
                   help="requests that may wait for the model; one more gets 503 server_overloaded with "
                        "Retry-After (default 16)")
    p.add_argument("--max-connections", type=int, default=64,
                   help="open connections uvicorn accepts; more get 503 (default 64)")
    p.add_argument("--max-batch-size", type=int, default=4,
                   help="waiting non-streaming requests with equal settings run as one batch of up to this many "
                        "(default 4; 1 = strictly one at a time)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice, one per core)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default info)")
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args) -> int:
    import uvicorn  # the command's imports wait for the command: `tinygptv --help` stays instant

    check_args(args)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    app = app_from_args(load_serving_model(args), args)
    settings = app.state.settings
    if settings.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host} without an API key: anyone who can reach it can use the model "
              f"(set --api-key or ${API_KEY_ENV})", file=sys.stderr)
    print(f"serving {settings.model_id!r} at http://{args.host}:{args.port}/v1 (OpenAI chat completions)",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, limit_concurrency=args.max_connections)
    return 0


def load_serving_model(args):
    """The one place serve loads its model."""
    return load_for_args(args)


def check_args(args) -> None:
    """Fail before loading the model, naming the flag."""
    positive = {"--max-body-mb": args.max_body_mb, "--max-tokens-limit": args.max_tokens_limit,
                "--queue-size": args.queue_size, "--max-batch-size": args.max_batch_size,
                "--max-new-tokens": args.max_new_tokens, "--max-connections": args.max_connections}
    for flag, value in positive.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be positive, got {value}")
    if not (math.isfinite(args.request_timeout) and args.request_timeout >= 0):
        raise ValueError(f"--request-timeout must be a number of seconds >= 0, got {args.request_timeout}")
    input_limits(args)
    if args.max_new_tokens > args.max_tokens_limit:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} is above --max-tokens-limit {args.max_tokens_limit}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0..65535, got {args.port}")
    if args.allow_local_files is not None and not args.allow_local_files.is_dir():
        raise ValueError(f"--allow-local-files {args.allow_local_files}: not a folder")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    generation_settings(args)


def app_from_args(model, args):
    """The FastAPI app for a loaded model and parsed `serve` flags (tests build their server this way too)."""
    from tinygptv.serve.openai_api import ServeSettings, create_app  # FastAPI: only when serving
    from tinygptv.serve.openai_schema import Limits

    check_args(args)
    name = args.model.rstrip("/\\") or args.model
    model_id = args.served_model_name or (Path(name).name if Path(name).is_dir() else name)
    max_prompt_tokens, max_pixels = input_limits(args)
    limits = Limits(
        max_image_pixels=max_pixels,
        max_tokens=args.max_tokens_limit,
        default_max_tokens=args.max_new_tokens,
        allow_local_files=args.allow_local_files,
        max_prompt_tokens=max_prompt_tokens,
    )
    settings = ServeSettings(
        model_id=model_id,
        template=args.template or inference_template(model.config.prompt.template),
        aliases=tuple(dict.fromkeys(a for a in [*args.model_alias, args.model] if a != model_id)),
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        task=args.task,
        max_body_bytes=int(args.max_body_mb * 2**20),
        limits=limits,
        defaults=generation_settings(args),
        queue_size=args.queue_size,
        max_batch=args.max_batch_size,
        time_limit=args.request_timeout or None,
    )
    return create_app(model, settings)
