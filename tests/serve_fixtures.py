# Helpers for the tests that run `tinygptv serve` for real: its flags parsed as the command line parses them, and the
# app served by uvicorn in a thread, on a free port, for as long as the test needs it.
from __future__ import annotations

import argparse
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import uvicorn

from tinygptv.serve.serve_cli import add_serve_parser


def parse_serve(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tinygptv")
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


@contextmanager
def serving(app, host: str = "127.0.0.1") -> Iterator[int]:
    """Serve `app` until the block ends; yields the port."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(30)
