# `tinygptv demo`: load a model and serve serve/web_demo.py's page, registered into the main parser by tinygptv/cli.py.
# Data path: the same load -> ChatSession -> stream_generate as `tinygptv chat`, behind a local web page.
from __future__ import annotations

import argparse
import os
import sys

from tinygptv.cli_options import (
    add_input_limit_args, add_model_args, examples, generation_settings, input_limits, load_for_args,
)


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    """Add `demo` to the main parser's sub-parsers."""
    p = subparsers.add_parser(
        "demo", help="chat about an image in a local web page (Gradio)",
        description="Start a web page to chat with a model about an image: upload an image, ask, and watch the answer "
                    "stream in; task tags ([vqa], [grounding], ...), temperature, top-p and beams are on the page, and "
                    "the boxes of a grounding answer are drawn onto the image. A new image starts a new "
                    "conversation. The page listens on this machine only (127.0.0.1) unless --host says otherwise; "
                    "one answer is generated at a time. The model options below set the page's starting values. "
                    "docs/demo.md: how to use it.",
        **examples("tinygptv demo --open                # the bundled model, in your browser",
                   "tinygptv demo --model tinygptv-stage3 --quant int8 --port 7861"))
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    p.add_argument("--share", action="store_true",
                   help="also publish the page through a temporary public gradio.live link (off by default: anyone "
                        "with the link can use your model and machine)")
    p.add_argument("--open", action="store_true", help="open the page in a web browser once it is up")
    add_model_args(p)
    add_input_limit_args(p)
    p.set_defaults(func=cmd_demo)
    return p


def cmd_demo(args) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local demo reports nothing to anyone
    from tinygptv.serve.web_demo import build_demo  # Gradio: only when the demo runs

    from tinygptv.checkpoint.loading import BUNDLED

    settings = generation_settings(args)
    max_prompt_tokens, max_pixels = input_limits(args)
    model = load_for_args(args)
    bundled = BUNDLED.get(args.model)
    demo = build_demo(
        model, args.model, note=bundled.note if bundled else None, template=args.template,
        task=args.task or (bundled.task if bundled else None), max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature, top_p=settings.top_p, num_beams=settings.num_beams,
        repetition_penalty=settings.repetition_penalty, max_prompt_tokens=max_prompt_tokens,
        max_image_pixels=max_pixels,
    )
    # quiet: Gradio's own banner tells the user to edit launch() for a public link; --share is how, here
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, inbrowser=args.open, quiet=True,
                prevent_thread_lock=True)
    print(f"demo of {args.model!r} at {demo.local_url}" + (f" and {demo.share_url}" if demo.share_url else
          " (this machine only; --share publishes a temporary public link)"), file=sys.stderr, flush=True)
    demo.block_thread()  # until Ctrl-C
    return 0
