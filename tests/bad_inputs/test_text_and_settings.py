# Bad questions and decoding flags on ask and chat: out-of-range or non-finite sampling flags, bytes that are not
# UTF-8 (in argv and on chat's stdin), prompts longer than the model's context or the configured limit. Each is one
# line naming the flag or the problem, before any generation; chat reports it and the session goes on.
from __future__ import annotations

import io
import subprocess
import sys
import time

import pytest

from tinygptv.checkpoint.native import load_pretrained
from tinygptv.cli import main
from tinygptv.model.generation import GenerationSettings, PromptTooLong
from tinygptv.serve.chat import ChatSession, run_chat

BAD_FLAGS = [
    (["--top-p", "7"], "--top-p: top_p must be in (0, 1], got 7.0"),
    (["--top-p", "0"], "--top-p"),
    (["--temperature", "nan"], "--temperature: temperature must be a finite number, got nan"),
    (["--temperature", "inf"], "--temperature"),
    (["--temperature", "-1"], "--temperature"),
    (["--num-beams", "0"], "--num-beams"),
    (["--num-beams", "17"], "--num-beams"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--repetition-penalty", "0"], "--repetition-penalty"),
    (["--max-prompt-tokens", "0"], "--max-prompt-tokens must be at least 1"),
    (["--max-image-megapixels", "0"], "--max-image-megapixels must be a positive number"),
    (["--max-image-megapixels", "nan"], "--max-image-megapixels"),
    (["--max-image-megapixels", "inf"], "--max-image-megapixels"),
]


@pytest.mark.parametrize("command", ["ask", "chat"])
@pytest.mark.parametrize("flags, words", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_naming_the_flag(command, flags, words, capsys):
    question = ["what?"] if command == "ask" else []
    assert main([command, "--model", "/nonexistent-model", *flags, *question]) == 2  # before any model is looked for
    err = capsys.readouterr().err
    assert err.startswith(f"tinygptv {command}: error: ") and words in err and err.count("\n") == 1


def test_a_question_with_bytes_that_are_not_utf8(capsys):
    assert main(["ask", "--model", "/nonexistent-model", "caf\udcff au lait"]) == 2
    assert "the question is not valid UTF-8 (byte 0xff at character 3)" in capsys.readouterr().err


def test_raw_bytes_in_argv_end_in_one_line():
    """The issue's case as a user meets it: Python decodes argv with surrogateescape."""
    ran = subprocess.run([sys.executable, "-m", "tinygptv.cli", "ask", b"caf\xff"], capture_output=True, timeout=120)
    assert ran.returncode == 2 and b"Traceback" not in ran.stderr
    assert ran.stderr.strip().splitlines() == [b"tinygptv ask: error: the question is not valid UTF-8 (byte 0xff at "
                                               b"character 3)"]


def test_chat_stdin_with_bad_bytes_reports_and_goes_on(tiny_dir, colour_images):
    session = ChatSession(load_pretrained(tiny_dir), settings=GenerationSettings(max_new_tokens=3))
    session.set_image(colour_images["red"])
    stdin = io.TextIOWrapper(io.BytesIO(b"what \xff\xfe colour?\nwhat colour is it?\n/quit\n"), encoding="utf-8")
    out = io.StringIO()
    run_chat(session, stdin, out)
    assert "error: the question is not valid UTF-8 (byte 0xff at character 5)" in out.getvalue()
    assert session.conversation.turns[0][0].endswith("what colour is it?")  # the next line was asked and answered
    assert len(session.conversation.turns) == 1 and session.conversation.turns[0][1] is not None


def test_a_prompt_too_long_is_refused_before_generation_and_the_session_goes_on(tiny_dir, colour_images):
    model = load_pretrained(tiny_dir)  # tiny preset: a 512-token context
    session = ChatSession(model, settings=GenerationSettings(max_new_tokens=10))
    session.set_image(colour_images["red"])
    for text, read in (("why " * 200, True), ("why " * 500_000, False)):  # 800 characters; 2 MB
        started = time.perf_counter()
        with pytest.raises(PromptTooLong, match="too long .*context of 512 tokens less max_new_tokens 10") as e:
            session.ask(text)
        assert time.perf_counter() - started < 1.0
        assert (e.value.tokens is not None) == read  # 2 MB cannot fit whatever it holds: refused without tokenizing
    assert session.conversation.turns == []
    session.ask("what colour is it?")
    assert len(session.conversation.turns) == 1
    limited = ChatSession(model, settings=GenerationSettings(max_new_tokens=10), max_prompt_tokens=20)
    with pytest.raises(PromptTooLong, match=r"the prompt is \d+ tokens: too long \(the limit is 20 prompt tokens\)"):
        limited.ask("what colour is it? " * 3)


def test_ask_and_chat_report_a_long_prompt_in_one_line(tiny_dir, capsys):
    assert main(["ask", "--model", tiny_dir, "--max-prompt-tokens", "8", "a question of more than eight tokens"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "too long (the limit is 8 prompt tokens)" in err
    session = ChatSession(load_pretrained(tiny_dir), settings=GenerationSettings(max_new_tokens=2))
    out = io.StringIO()
    run_chat(session, io.StringIO("x" * 600 + "\nhi\n/quit\n"), out)
    assert "; /reset starts a new conversation" in out.getvalue()
    assert len(session.conversation.turns) == 1  # the long line was dropped, "hi" was answered
