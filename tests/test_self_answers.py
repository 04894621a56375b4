# Stage 4's text-only turns (tinygptv/train/self_answers.py): the LM's own greedy answers, filtered, written
# atomically in the llava_json format that the recipe reads back.
from __future__ import annotations

import json
import os

import pytest

from tinygptv.atomic import write_json_atomic
from tinygptv.data.datasets.llava import LlavaJson
from tinygptv.data.templates import single_prompt
from tinygptv.checkpoint.loading import load_model
from tinygptv.train import self_answers
from tinygptv.train.self_answers import chat_prompts, keep_answer


def test_prompts_are_distinct_and_leave_out_the_held_out_check():
    prompts = chat_prompts()
    assert len(prompts) == len(set(prompts)) > 100
    assert not any("France" in p for p in prompts)  # the model card's text-only check stays unseen


def test_faulty_answers_are_dropped():
    assert keep_answer("Rome is the capital of Italy.", 8, 128)
    assert keep_answer("yes", 1, 128)
    assert not keep_answer("", 0, 128)
    assert not keep_answer("cut off at the limit", 127, 128)
    assert not keep_answer("a lark, " * 20, 60, 128)
    long_fine = "Photosynthesis is how plants turn light, water and air into sugar and oxygen for themselves."
    assert keep_answer(long_fine, 20, 128)


def test_written_turns_are_the_models_own_answers_and_read_back_text_only(trained_dir, tmp_path, monkeypatch):
    prompts = chat_prompts()[:5]
    monkeypatch.setattr(self_answers, "chat_prompts", lambda: prompts)
    monkeypatch.setattr(self_answers, "keep_answer", lambda answer, n, limit: bool(answer))
    out = tmp_path / "text" / "answers.json"
    assert self_answers.main(["--out", str(out), "--model", trained_dir, "--max-new-tokens", "6"]) == 0
    records = json.loads(out.read_text())
    model = load_model(trained_dir, quiet=True)
    expected = model.generate(None, [single_prompt(model.config.prompt.template, p, with_image=False) for p in prompts],
                              max_new_tokens=6)
    assert [r["conversations"][0]["value"] for r in records] == [p for p, a in zip(prompts, expected) if a.strip()]
    assert [r["conversations"][1]["value"] for r in records] == [a.strip() for a in expected if a.strip()]
    dataset = LlavaJson(out)
    assert len(dataset) == len(records) and dataset[0].image is None
    assert dataset[0].turns == [(records[0]["conversations"][0]["value"], records[0]["conversations"][1]["value"])]


def test_a_write_that_fails_midway_keeps_the_previous_file(tmp_path):
    out = tmp_path / "answers.json"
    write_json_atomic(out, [{"conversations": []}])
    before = out.read_text()
    with pytest.raises(TypeError):  # the second record cannot be serialised: json.dump fails after writing part
        write_json_atomic(out, [{"conversations": []}, {"bad": object()}])
    assert out.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["answers.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
