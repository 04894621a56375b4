# Bad requests to `tinygptv serve` (the real server: uvicorn in a thread, the tiny model): malformed or hostile JSON,
# non-finite and out-of-range fields, text that is not Unicode, prompts past the context, image bombs and broken
# images, a full queue, a slow or vanished client. Each gets a 4xx (or 503) in OpenAI's error shape, naming the
# problem, and the next request is answered in its normal time; a request cannot hold the model past its time limit
# or after its client has gone.
from __future__ import annotations

import base64
import json
import socket
import time
from types import SimpleNamespace

import httpx
import pytest

from bad_inputs.hostile import bomb_png, noisy_image, png_bytes
from tinygptv.checkpoint.native import load_pretrained
from serve_fixtures import parse_serve, serving
from tinygptv.serve.serve_cli import app_from_args

GOOD = {"role": "user", "content": "hi"}
LONG = 300  # answer tokens: with the template, most of the tiny model's 512-token context


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed")
    bomb_png(allowed / "bomb.png", 30000, 30000)
    model = load_pretrained(tiny_dir)
    args = parse_serve(["--model", tiny_dir, "--port", "0", "--max-body-mb", "4", "--max-image-megapixels", "1",
                        "--max-tokens-limit", "400", "--max-new-tokens", "2", "--allow-local-files", str(allowed)])
    app = app_from_args(model, args)
    with serving(app) as port:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}/v1/chat/completions", port=port, app=app, model=model,
                              allowed=allowed)


def post(server, body, timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url, content=content, headers={"Content-Type": "application/json"}, timeout=timeout)


def answers_in_normal_time(server) -> None:
    """A small request right after a bad one: answered, quickly (two new tokens of the tiny model)."""
    started = time.perf_counter()
    reply = post(server, {"messages": [GOOD], "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    assert time.perf_counter() - started < 5


@pytest.fixture
def slow_model(server, monkeypatch):
    """Every forward pass of the LLM takes 50 ms more: a LONG answer then takes at least 15 s, whatever the machine,
    so a request that is not stopped shows in the next one's wait."""
    llm, forward = server.model.llm, server.model.llm.forward

    def slowed(*args, **kwargs):
        time.sleep(0.05)
        return forward(*args, **kwargs)

    monkeypatch.setattr(llm, "forward", slowed)


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def with_image(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "what is it?"}]}]}


BAD_BODIES = {
    "nested 100000 deep": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply", None),
    "NaN literal": (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "NaN", None),
    "Infinity literal": (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}', "-Infinity", None),
    "1e999": (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}', "1e999", None),
    "5000-digit integer": (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}",
                           "not valid JSON", None),
    "bytes not UTF-8": (b'{"messages": [{"role": "user", "content": "caf\xff"}]}', "not valid JSON", None),
    "lone surrogate": (b'{"messages": [{"role": "user", "content": "caf\\udcff"}]}',
                       "messages[0].content: the text is not valid Unicode (byte 0xff at character 3)", None),
    "temperature 1e308": ({"messages": [GOOD], "temperature": 1e308}, "temperature=1e+308 is out of range", None),
    "top_p 7": ({"messages": [GOOD], "top_p": 7}, "top_p=7 is out of range", None),
    "max_tokens huge integer": ({"messages": [GOOD], "max_tokens": 10**40}, "is above this server's limit", None),
    "seed 2**70": ({"messages": [GOOD], "seed": 2**70}, "seed=", None),
    "stop of 300 characters": ({"messages": [GOOD], "stop": "x" * 300}, "at most 200 characters", None),
    "role is a list": ({"messages": [{"role": ["user"] * 1000, "content": "hi"}]}, "role ['user', 'user'", None),
    "prompt past the context": ({"messages": [{"role": "user", "content": "why " * 300}]},
                                "too long", "context_length_exceeded"),
}


def test_bad_bodies_are_400_and_the_next_request_is_served(server, tmp_path):
    bodies = dict(BAD_BODIES)
    bomb = bomb_png(tmp_path / "bomb.png", 30000, 30000).read_bytes()
    cut = png_bytes(noisy_image())[:600]
    bodies["bomb as data URL"] = (with_image(data_url(bomb)), "more than 179 megapixels", "image_too_large")
    bodies["truncated PNG as data URL"] = (with_image(data_url(cut)), "not a readable image", "invalid_image")
    bodies["bomb as file URL"] = (with_image((server.allowed / "bomb.png").as_uri()), "179 megapixels",
                                  "image_too_large")
    for case, (body, words, code) in bodies.items():
        started = time.perf_counter()
        reply = post(server, body)
        took = time.perf_counter() - started
        assert reply.status_code == 400, (case, reply.status_code, reply.text)
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and words in error["message"], (case, error)
        assert code is None or error["code"] == code, (case, error)
        assert took < 5, (case, took)
        answers_in_normal_time(server)


def test_a_huge_prompt_is_refused_at_once(server):
    """3 MB of text (under the 4 MB body limit): refused without being tokenized, in well under a second."""
    body = {"messages": [{"role": "user", "content": "why " * 750_000}]}
    started = time.perf_counter()
    reply = post(server, body)
    took = time.perf_counter() - started
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "context_length_exceeded"
    assert "not even counted" in reply.json()["error"]["message"]
    print(f"3 MB prompt refused in {took:.3f} s")
    assert took < 2.0, took  # a hang or a tokenization would take many seconds
    answers_in_normal_time(server)


def test_a_full_queue_is_503_with_retry_after(server, monkeypatch):
    monkeypatch.setattr(server.app.state.worker, "max_queue", 0)
    reply = post(server, {"messages": [GOOD]})
    assert reply.status_code == 503 and reply.headers["retry-after"] == "1"
    assert reply.json()["error"]["code"] == "server_overloaded"


def test_a_slow_body_gets_408(server, monkeypatch):
    monkeypatch.setattr(server.app.state.settings, "body_timeout", 0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"messages\"")
        reply = b""
        while b"}}" not in reply and (chunk := sock.recv(65536)):  # the JSON error ends with "}}"
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in reply
    answers_in_normal_time(server)


def test_the_time_limit_ends_a_long_answer(server, slow_model, monkeypatch):
    monkeypatch.setattr(server.app.state.worker, "time_limit", 1.0)
    started = time.perf_counter()
    reply = post(server, {"messages": [GOOD], "max_tokens": LONG})
    took = time.perf_counter() - started
    choice, usage = reply.json()["choices"][0], reply.json()["usage"]
    assert choice["finish_reason"] == "length" and usage["completion_tokens"] < LONG
    assert took < 6, took  # one second of generation, plus a token, the prompt and the reply


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_frees_the_model(server, slow_model, stream):
    """A 300-token answer takes the slowed model 15 s; once its client disconnects, the next request is answered
    without waiting for it."""
    body = json.dumps({"messages": [GOOD], "max_tokens": LONG, "stream": stream}).encode()
    headers = {"Content-Type": "application/json"}
    if stream:
        with httpx.stream("POST", server.url, content=body, headers=headers, timeout=60) as reply:
            assert next(reply.iter_lines()).startswith("data: ")  # generation has started
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url, content=body, headers=headers, timeout=1.0)
    answers_in_normal_time(server)
