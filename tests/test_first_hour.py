# What a new user meets first: Ctrl-C while an answer streams stops the answer, not the program (ask exits 130 with
# one line, chat goes back to its prompt with the conversation kept); a looping answer is cut; --version and a
# bad flag answer without loading anything; the default model says what it is for.
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import tiny_model
from tinygptv.checkpoint.native import save_pretrained
from tinygptv.cli import main
from tinygptv.model.generation import GenerationSettings
from tinygptv.model.stopping import RepeatGuard
from tinygptv.serve.chat import ChatSession

CRASH_SIGNS = ("terminate called", "Aborted", "Traceback", "core dumped")


@pytest.fixture(scope="module")
def endless(tmp_path_factory) -> list[str]:
    """A tiny random model that can only say "a" and " " (every other logit pushed to -inf), so it never ends its
    answer and its text streams word by word: it decodes for as long as it is allowed, long enough to be interrupted
    mid-answer."""
    model = tiny_model(seed=5)
    with torch.no_grad():
        bias = model.llm.lm_head.bias
        bias.fill_(-1e9)
        bias[[ord("a"), ord(" ")]] = 0.0
    folder = tmp_path_factory.mktemp("endless") / "model"
    save_pretrained(model, folder)
    return ["--model", str(folder), "--max-new-tokens", "300", "--max-repeats", "0"]


def start(args: list[str]) -> subprocess.Popen:
    """The command in a new process that takes Ctrl-C as a terminal gives it: a test runner started in the background
    inherits SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "tinygptv.cli", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, bufsize=0,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def read_until(stream, marker: bytes, timeout: float = 120) -> bytes:
    seen, end = b"", time.monotonic() + timeout
    while marker not in seen:
        ready, _, _ = select.select([stream], [], [], max(0.0, end - time.monotonic()))
        if not ready:
            raise AssertionError(f"never saw {marker!r} in {timeout} s; got {seen[-300:]!r}")
        byte = stream.read(1)
        if not byte:
            raise AssertionError(f"the stream ended before {marker!r}; got {seen[-300:]!r}")
        seen += byte
    return seen


@pytest.mark.slow
def test_ctrl_c_during_a_streamed_answer_ends_ask_cleanly(endless):
    proc = start(["ask", *endless, "say something long"])
    read_until(proc.stdout, b"a")  # the answer has started streaming
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    text = err.decode()
    assert proc.returncode == 130, text
    assert "interrupted" in text and not any(sign in text for sign in CRASH_SIGNS), text


@pytest.mark.slow
def test_ctrl_c_during_a_streamed_answer_returns_chat_to_its_prompt(endless):
    proc = start(["chat", *endless])
    read_until(proc.stdout, b"you> ")
    proc.stdin.write(b"say something long\n")
    proc.stdin.flush()
    read_until(proc.stdout, b"tinygptv> ")
    read_until(proc.stdout, b"a")  # the answer has started streaming
    proc.send_signal(signal.SIGINT)
    read_until(proc.stdout, b"(stopped)")
    read_until(proc.stdout, b"you> ")  # back at the prompt: the session is alive
    out, err = proc.communicate(b"/quit\n", timeout=60)
    text = err.decode()
    assert proc.returncode == 0 and not any(sign in text for sign in CRASH_SIGNS), text


def test_an_interrupted_answer_stays_in_the_conversation():
    """What the user saw of a stopped answer is the answer the next question follows; a question with nothing shown
    is taken back."""
    session = ChatSession(tiny_model(), settings=GenerationSettings(max_new_tokens=40, stop_strings=()))
    pieces = []

    def interrupt(text):
        pieces.append(text)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        session.ask("first?", on_text=interrupt)
    assert session.conversation.turns == [("first?", pieces[0].strip())]

    session.model.generate = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)  # stopped before any text
    with pytest.raises(KeyboardInterrupt):
        session.ask("second?")
    assert len(session.conversation.turns) == 1  # the unanswered question was taken back


def test_a_looping_answer_is_cut():
    guard = RepeatGuard(4)
    assert guard.looping([7, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3])  # "a cat, " four times
    assert not guard.looping([1, 2, 3, 1, 2, 3, 1, 2, 3])  # three times is not yet a loop
    assert not guard.looping([5, 5, 5, 5])  # "!!!!" is text: a loop covers at least 8 tokens
    assert not guard.looping(list(range(40)))
    with pytest.raises(ValueError, match="max_repeats"):
        GenerationSettings(max_repeats=1)


def test_version_and_argument_errors_answer_without_loading_anything(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("tinygptv ") and "torch " in printed and "transformers " in printed
    with pytest.raises(SystemExit) as exit_info:
        main(["ask"])  # no question
    assert exit_info.value.code == 2
    assert main(["ask", "--top-p", "7", "what?"]) == 2  # checked before the model loads
    assert "--top-p: top_p must be in (0, 1], got 7" in capsys.readouterr().err
