# `tinygptv info` gives the spec's parameter counts for the full-size presets without allocating them, and the
# main job's CLI (ask, chat) answers, streams, and fails clearly on bad input.
from __future__ import annotations

import io
import json

import pytest

from tinygptv.cli import main
from tinygptv.config import preset
from tinygptv.info import parameter_counts
from tinygptv.serve.chat import ChatSession, run_chat
from tinygptv.checkpoint.native import load_pretrained
from tinygptv.model.generation import GenerationSettings


@pytest.mark.parametrize("name, lora, trainable", [
    ("tinygptv-stage1", 0, 13_809_664),
    ("tinygptv-stage4", 31_457_280, 45_266_944),
])
def test_full_size_counts_match_the_spec(name, lora, trainable):
    info = parameter_counts(preset(name))
    p = info["parameters"]
    assert p["llm"] == 2_779_683_840
    assert p["added_norms"] == 92_160
    assert p["qformer"] == 105_162_240
    assert p["projector"] == 13_638_144
    assert p["lora"] == lora
    assert info["trainable"] == trainable
    # EVA ViT-g at 224 px is 985,894,528; at 448 px the position table grows from 257 to 1025 rows of 1408
    assert p["vision"] == 985_894_528 + (1025 - 257) * 1408 * (preset(name).vision.image_size == 448)


def test_info_json_cli(capsys):
    assert main(["info", "--preset", "tinygptv-stage3", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"]["vision"] == 985_894_528
    assert info["vision_tokens"] == 257 and info["image_embeddings"] == 32
    assert info["config"]["prompt"]["template"] == "stage3"


def test_ask_answers_about_the_image(trained_dir, colour_images, capsys):
    for colour in ("red", "blue"):
        rc = main(["ask", "--model", trained_dir, "--image", colour_images[colour], "--template", "stage3",
                   "what colour is it?"])
        assert rc == 0
        assert capsys.readouterr().out.strip() == colour


@pytest.mark.parametrize("args, message", [
    (["--image", "{missing}"], "no such image file"),
    (["--image", "{not_image}"], "not an image in a supported format"),
    (["--model", "{no_model}"], "no such model folder"),
])
def test_ask_reports_bad_input(tmp_path, capsys, args, message):
    (tmp_path / "notes.txt").write_text("not a picture")
    paths = dict(missing=tmp_path / "nope.png", not_image=tmp_path / "notes.txt", no_model=tmp_path / "no-model")
    rc = main(["ask", *[a.format(**paths) for a in args], "what?"])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and str(tmp_path) in err


def test_chat_turns_image_switch_and_reset(trained_dir, colour_images):
    session = ChatSession(load_pretrained(trained_dir), template="stage3",
                          settings=GenerationSettings(max_new_tokens=10))
    script = io.StringIO(f"/image {colour_images['red']}\nwhat colour is it?\n/image {colour_images['blue']}\n"
                         "what colour is it?\n/image /no/such.png\n/image\n/help\n/reset\n/frobnicate\n/quit\n")
    out = io.StringIO()
    run_chat(session, stdin=script, stdout=out)
    text = out.getvalue()
    assert "tinygptv> red\n" in text and "tinygptv> blue\n" in text
    assert "error: /no/such.png: no such image file" in text
    assert "usage: /image PATH" in text  # not ".: no such image file"
    assert "/noimage" in text.split("/reset")[0]  # /help lists the commands
    assert "(conversation reset; the image stays" in text and "unknown command /frobnicate" in text
    assert session.conversation.turns == [] and session.image_embeds is not None


def test_chat_noimage_goes_back_to_text_only(trained_dir, colour_images):
    session = ChatSession(load_pretrained(trained_dir), template="stage3",
                          settings=GenerationSettings(max_new_tokens=10))
    out = io.StringIO()
    run_chat(session, stdin=io.StringIO(f"/image {colour_images['red']}\n/noimage\nwhat colour is it?\n"),
             stdout=out)
    assert "(no image: text-only questions" in out.getvalue()
    assert session.image_embeds is None and "<ImageHere>" not in session.conversation.prompt()


def test_chat_keeps_the_conversation_and_the_image_embeddings(trained_dir, colour_images):
    session = ChatSession(load_pretrained(trained_dir), template="stage3",
                          settings=GenerationSettings(max_new_tokens=10))
    session.set_image(colour_images["red"])
    cached = session.image_embeds
    assert session.ask("what colour is it?") == "red"
    session.ask("and now?")
    assert session.image_embeds is cached
    prompt = session.conversation.prompt()
    assert prompt.startswith("###Human: <Img><ImageHere></Img> what colour is it? ###Assistant: red###")
    assert prompt.count("<ImageHere>") == 1


def test_grounding_boxes_are_drawn_where_the_grid_says(tmp_path):
    from PIL import Image

    from tinygptv.serve.draw import boxes_in, draw_boxes

    answer = "There are two shapes: <p>a red circle</p> {<10><20><50><60>}, <p>a box</p> {<60><0><100><40>}."
    assert boxes_in(answer) == [("a red circle", (10, 20, 50, 60)), ("a box", (60, 0, 100, 40))]
    Image.new("RGB", (200, 100), (255, 255, 255)).save(tmp_path / "in.png")
    assert draw_boxes(tmp_path / "in.png", answer, tmp_path / "out.png") == 2
    out = Image.open(tmp_path / "out.png").convert("RGB")
    assert out.getpixel((20, 40)) != (255, 255, 255)  # left edge of the first box: x = 10% of 200, y in 20-60
    assert out.getpixel((60, 40)) == (255, 255, 255)  # inside the first box, away from its label
    assert draw_boxes(tmp_path / "in.png", "no box here", tmp_path / "none.png") == 0
