# `tinygptv serve` end to end: the real server (uvicorn in a thread, built from parsed `serve` flags) with the bundled
# nano model, driven by the official `openai` client. Answers must equal what `tinygptv chat` gives for the same turns.
from __future__ import annotations

import argparse
import base64
import io
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
from PIL import Image

from tinygptv.data.templates import single_prompt
from tinygptv.model.generation import GenerationSettings
from tinygptv.serve.chat import ChatSession
from tinygptv.serve.openai_schema import ChatRequest, build_prompt
from serve_fixtures import parse_serve, serving
from tinygptv.serve.serve_cli import add_serve_parser, app_from_args
from tinygptv.serve.worker import GenerationWorker, Job, QueueFull

IMAGE = Path(__file__).resolve().parent.parent / "examples" / "red_circle.png"
QUESTION, FOLLOW_UP = "What is in this image?", "What colour is the circle?"
TEXT_QUESTION = "Write a sentence about the sea."  # a long answer, for the length and stop checks
TOKENS = 10
KEY = "test-key"


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_message(url: str, question: str = QUESTION) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": question}]}


@pytest.fixture(scope="module")
def reference(nano):
    """Greedy answers of `tinygptv chat` (ChatSession) for the questions the tests send."""
    session = ChatSession(nano, settings=GenerationSettings(max_new_tokens=TOKENS))
    session.set_image(str(IMAGE))
    first, follow_up = session.ask(QUESTION), session.ask(FOLLOW_UP)
    text_only = ChatSession(nano, settings=GenerationSettings(max_new_tokens=TOKENS)).ask(TEXT_QUESTION)
    return SimpleNamespace(first=first, follow_up=follow_up, text_only=text_only, image_embeds=session.image_embeds)


@pytest.fixture(scope="module")
def server(nano, tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed")
    shutil.copy(IMAGE, allowed / IMAGE.name)
    args = parse_serve(["--port", "0", "--api-key", KEY, "--max-new-tokens", str(TOKENS), "--max-body-mb", "0.5",
                        "--max-image-megapixels", "1", "--max-tokens-limit", "64", "--allow-local-files", str(allowed),
                        "--model-alias", "gpt-4o-mini"])
    app = app_from_args(nano, args)
    with serving(app, args.host) as port:
        yield SimpleNamespace(url=f"http://{args.host}:{port}/v1", app=app, allowed=allowed)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def test_defaults_and_help():
    args = parse_serve([])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 8000, "tinygptv-nano")
    assert args.allow_local_files is None and args.api_key is None
    parser = argparse.ArgumentParser()
    text = add_serve_parser(parser.add_subparsers()).format_help()
    for flag in ("--allow-local-files", "--api-key", "--max-body-mb", "--max-image-megapixels", "--max-tokens-limit",
                 "--queue-size", "--max-batch-size"):
        assert flag in text


def test_flags_become_settings(nano, tmp_path, monkeypatch):
    monkeypatch.setenv("TINYGPTV_API_KEY", "from-env")
    folder = tmp_path / "my-stage4"
    folder.mkdir()
    settings = app_from_args(nano, parse_serve(["--model", str(folder), "--model-alias", "gpt-4o"])).state.settings
    assert settings.api_key == "from-env" and settings.model_id == "my-stage4"
    assert settings.aliases == ("gpt-4o", str(folder)) and settings.template == "chatml"
    with pytest.raises(ValueError, match="--max-tokens-limit"):
        app_from_args(nano, parse_serve(["--max-new-tokens", "500", "--max-tokens-limit", "100"]))


def test_image_answer_equals_chat_session(client, reference, nano):
    reply = client.chat.completions.create(model="tinygptv-nano", messages=[image_message(data_url(IMAGE))])
    assert reply.choices[0].message.content == reference.first and reference.first
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion" and reply.model == "tinygptv-nano"
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason == "stop"
    # usage counts every position the LLM reads: BOS, text tokens and the 32 image query tokens
    prompt = single_prompt("chatml", QUESTION)
    inputs = nano.build_inputs([prompt], reference.image_embeds, padding_side="left")
    assert reply.usage.prompt_tokens == inputs.inputs_embeds.shape[1]
    assert reply.usage.completion_tokens == len(nano.tokenize(reference.first))
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_joins_to_the_same_answer(client, reference):
    chunks = list(client.chat.completions.create(model="tinygptv-nano", messages=[image_message(data_url(IMAGE))],
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference.first
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


def test_history_is_rebuilt_into_the_template(client, reference):
    messages = [image_message(data_url(IMAGE)), {"role": "assistant", "content": reference.first},
                {"role": "user", "content": FOLLOW_UP}]
    reply = client.chat.completions.create(model="tinygptv-nano", messages=messages)
    assert reply.choices[0].message.content == reference.follow_up


def test_local_file_url_inside_the_allowed_folder(client, server, reference):
    url = (server.allowed / IMAGE.name).resolve().as_uri()
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=[image_message(url)])  # an alias
    assert reply.choices[0].message.content == reference.first


def test_length_stop_and_seeded_sampling(client, reference):
    ask = dict(model="tinygptv-nano", messages=[{"role": "user", "content": TEXT_QUESTION}])
    assert client.chat.completions.create(**ask).choices[0].message.content == reference.text_only
    short = client.chat.completions.create(**ask, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    assert reference.text_only.startswith(short.choices[0].message.content)
    cut = reference.text_only.index(" ", 3)
    stopped = client.chat.completions.create(**ask, stop=[reference.text_only[cut:cut + 3]])
    assert stopped.choices[0].message.content == reference.text_only[:cut].strip()
    sampled = [client.chat.completions.create(**ask, temperature=1.5, top_p=1.0, seed=7).choices[0].message.content
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_concurrent_clients_get_their_own_answers(client, reference):
    requests = [dict(messages=[image_message(data_url(IMAGE))]),
                dict(messages=[{"role": "user", "content": TEXT_QUESTION}]),
                dict(messages=[image_message(data_url(IMAGE))], stream=True)]

    def ask(kwargs):
        reply = client.chat.completions.create(model="tinygptv-nano", **kwargs)
        if kwargs.get("stream"):
            return "".join(c.choices[0].delta.content or "" for c in reply if c.choices)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(ask, requests))
    assert answers == [reference.first, reference.text_only, reference.first]


def test_worker_batches_waiting_requests_without_changing_answers(nano, reference):
    """Jobs queued while the worker is not yet running are taken as one left-padded batch (prompts of different
    lengths, with and without an image); each answer equals the one-by-one answer."""
    from tinygptv.data.image_processor import ImageProcessor

    pixels = ImageProcessor(nano.config.vision)(str(IMAGE))
    settings = GenerationSettings(max_new_tokens=TOKENS, stop_strings=[nano.config.prompt.end_sym])
    results: dict[int, str] = {}
    done = threading.Semaphore(0)

    def job(i, question, with_image):
        def finish(result):
            results[i] = result.text
            done.release()
        return Job(single_prompt("chatml", question, with_image=with_image), pixels if with_image else None,
                   settings, on_done=finish, on_error=lambda e: (results.__setitem__(i, repr(e)), done.release()))

    worker = GenerationWorker(nano, max_queue=3, max_batch=4)
    encoded, batches = [], []
    worker.model = SimpleNamespace(**{name: getattr(nano, name) for name in ("tokenize", "prompt_tokens", "config")},
                                   encode_image=lambda px: encoded.append(px) or nano.encode_image(px),
                                   generate=lambda *a, **k: batches.append(len(a[1])) or nano.generate(*a, **k))
    worker.submit(job(0, QUESTION, True))
    worker.submit(job(1, TEXT_QUESTION, False))
    worker.submit(job(2, "Describe the image in detail, please.", True))
    with pytest.raises(QueueFull):
        worker.submit(job(3, QUESTION, True))
    worker.start()
    try:
        for _ in range(3):
            assert done.acquire(timeout=120)
    finally:
        worker.stop(timeout=60)
    assert batches == [3]  # one generate() call for the three waiting jobs
    assert len(encoded) == 1  # jobs 0 and 2 send the same image: encoded once, then taken from the cache
    alone = ChatSession(nano, settings=GenerationSettings(max_new_tokens=TOKENS))
    alone.set_image(str(IMAGE))
    assert results == {0: reference.first, 1: reference.text_only,
                       2: alone.ask("Describe the image in detail, please.")}


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tinygptv-nano"]
    assert client.models.retrieve("tinygptv-nano").id == "tinygptv-nano"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    health = httpx.get(server.url.removesuffix("/v1") + "/health")  # open without a key, for load balancers
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_api_key_is_required(server):
    wrong = openai.OpenAI(base_url=server.url, api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        wrong.chat.completions.create(model="tinygptv-nano", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(server.url + "/models").status_code == 401


def big_image_url() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (1500, 1000), (200, 30, 30)).save(buffer, format="PNG")  # 1.5 MP, a few kB
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


BAD_REQUESTS = {
    "n": (dict(n=2), "n=2"),
    "malformed data URL": (dict(messages=[image_message("data:image/png;base64,not*base64")]), "base64"),
    "not an image": (dict(messages=[image_message("data:image/png;base64," + base64.b64encode(b"hello").decode())]),
                     "not an image in a supported format"),
    "http URL": (dict(messages=[image_message("https://example.com/cat.png")]), "only data: URLs"),
    "max_tokens": (dict(max_tokens=100), "max_tokens=100 is above"),
    "too many pixels": (dict(messages=[image_message(big_image_url())]), "megapixels"),
    "two images": (dict(messages=[image_message(data_url(IMAGE)), {"role": "assistant", "content": "a circle"},
                                  image_message(data_url(IMAGE))]), "one image per conversation"),
    "ends with assistant": (dict(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]),
                            "last message must be a user message"),
    "tool role": (dict(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]), "role 'tool'"),
    "temperature": (dict(temperature=3), "temperature=3"),
    "placeholder in text": (dict(messages=[{"role": "user", "content": "hi <ImageHere>"}]), "<ImageHere>"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_are_400_naming_the_problem(client, case):
    change, words = BAD_REQUESTS[case]
    ask = {"model": "tinygptv-nano", "messages": [{"role": "user", "content": "hi"}], **change}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**ask)
    assert words in e.value.message
    assert e.value.body["type"] == "invalid_request_error"


def test_file_urls(client, server, monkeypatch, tmp_path):
    outside = tmp_path / "secret.png"
    shutil.copy(IMAGE, outside)
    with pytest.raises(openai.BadRequestError, match="outside the folder allowed"):
        client.chat.completions.create(model="tinygptv-nano", messages=[image_message(outside.as_uri())])
    inside_via_dots = (server.allowed / ".." / outside.parent.name / outside.name).as_uri()
    with pytest.raises(openai.BadRequestError, match="outside the folder allowed"):
        client.chat.completions.create(model="tinygptv-nano", messages=[image_message(inside_via_dots)])
    settings = server.app.state.settings
    monkeypatch.setattr(settings, "limits", type(settings.limits)(max_tokens=64))  # as without --allow-local-files
    with pytest.raises(openai.BadRequestError, match="--allow-local-files"):
        client.chat.completions.create(model="tinygptv-nano",
                                       messages=[image_message((server.allowed / IMAGE.name).as_uri())])


def test_body_over_the_limit_is_413(server):
    body = b'{"model": "tinygptv-nano", "messages": [{"role": "user", "content": "' + b"x" * 600_000 + b'"}]}'
    reply = httpx.post(server.url + "/chat/completions", content=body, timeout=60,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert reply.status_code == 413
    assert reply.json()["error"]["code"] == "request_too_large"


def test_full_queue_is_503(client, server, monkeypatch):
    monkeypatch.setattr(server.app.state.worker, "max_queue", 0)
    with pytest.raises(openai.InternalServerError, match="busy") as e:
        client.chat.completions.create(model="tinygptv-nano", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 503


def test_system_message_is_written_in_the_template():
    request = ChatRequest(model=None, turns=[("hi", "hello"), ("and?", None)], system="Be brief.")
    assert build_prompt(request, "chatml", "<|im_end|>\n") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        "hello<|im_end|>\n<|im_start|>user\nand?<|im_end|>\n<|im_start|>assistant\n")
    request.system = None
    assert build_prompt(request, "stage3-demo", "###").startswith("Give the following image")
