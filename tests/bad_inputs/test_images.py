# Bad and awkward images on every entry point that opens one (open_image itself, ask, chat, training batches, eval's
# processor, the web demo): each refusal is one line naming the file and the problem, decoded images are upright
# 8-bit RGB whatever their mode, and a bomb costs nothing. The server's data and file URLs are in test_server.py.
from __future__ import annotations

import io
import time

import pytest

from bad_inputs.hostile import (big_jpeg, bomb_png, cmyk_jpeg, grey16_png, noisy_image, png_bytes, rotated_photo,
                                transparent_png, truncated)
from tinygptv.checkpoint.native import load_pretrained
from tinygptv.cli import main
from tinygptv.config import preset
from tinygptv.data.image_file import EncodedImage, ImageError, ImageTooLarge, open_image
from tinygptv.data.image_processor import ImageProcessor
from tinygptv.model.generation import GenerationSettings
from tinygptv.serve.chat import ChatSession, run_chat


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory) -> dict[str, tuple]:
    """name -> (path, words the error must contain)."""
    folder = tmp_path_factory.mktemp("bad-images")
    eps = folder / "drawing.eps"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    text = folder / "notes.png"
    text.write_text("these are notes, not pixels")
    return {
        "bomb 30000x30000": (bomb_png(folder / "bomb30k.png", 30000, 30000), "more than 179 megapixels"),
        "bomb 12000x12000": (bomb_png(folder / "bomb12k.png", 12000, 12000), "12000x12000 = 144.0 megapixels"),
        "truncated PNG": (truncated(folder / "cut.png", png_bytes(noisy_image())), "not a readable image"),
        "empty file": (empty, "not an image in a supported format"),
        "text file": (text, "not an image in a supported format"),
        "EPS (Ghostscript)": (eps, "not an image in a supported format"),
    }


CASES = ["bomb 30000x30000", "bomb 12000x12000", "truncated PNG", "empty file", "text file", "EPS (Ghostscript)"]


@pytest.mark.parametrize("case", CASES)
def test_open_image_refuses_with_one_line_naming_the_file(bad_images, case):
    path, words = bad_images[case]
    started = time.perf_counter()
    with pytest.raises(ImageError) as e:
        open_image(path)
    assert time.perf_counter() - started < 2  # refused from the header, never decoded
    message = str(e.value)
    assert message.startswith(f"{path}: ") and words in message and "\n" not in message


def test_the_pixel_limit_is_configurable_and_bytes_are_named():
    upload = EncodedImage("upload", png_bytes(noisy_image()))
    with pytest.raises(ImageTooLarge, match=r"^upload: the image is 64x48 = 0.0 megapixels, above the limit of 0.001"):
        open_image(upload, max_pixels=1000)
    assert open_image(upload, max_pixels=64 * 48).size == (64, 48)


def test_awkward_but_valid_images_become_upright_rgb(tmp_path):
    upright = open_image(rotated_photo(tmp_path / "phone.jpg"))
    assert upright.size == (20, 40)  # EXIF orientation 6 applied: the photo is seen as it was taken
    red, blue = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert red[0] > 150 > red[2] and blue[2] > 150 > blue[0]
    grey = open_image(grey16_png(tmp_path / "grey16.png"))
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (0, 0, 0) and grey.getpixel((63, 0)) == (255, 255, 255)
    assert 100 < grey.getpixel((32, 0))[0] < 160  # scaled from 16 bits, not clipped to white
    r, g, b = open_image(cmyk_jpeg(tmp_path / "cmyk.jpg")).getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60
    for mode in ("RGBA", "P"):  # transparent pixels are laid on white
        assert open_image(transparent_png(tmp_path / f"clear-{mode}.png", mode)).getpixel((3, 3)) == (255, 255, 255)


def test_a_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path):
    photo = big_jpeg(tmp_path / "12mp.jpg")
    assert open_image(photo, draft_size=224).size == (1000, 750)  # 1/4 scale: both sides still >= 2 x 224
    assert open_image(photo).size == (4000, 3000)
    processor = ImageProcessor(preset("tiny").vision)
    assert processor(str(photo)).shape == (1, 3, processor.image_size, processor.image_size)


@pytest.mark.parametrize("case", ["bomb 30000x30000", "truncated PNG", "EPS (Ghostscript)"])
def test_ask_refuses_before_loading_a_model(bad_images, case, capsys):
    path, words = bad_images[case]
    started = time.perf_counter()
    assert main(["ask", "--model", "/nonexistent-model", "--image", str(path), "what is it?"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"tinygptv ask: error: {path}: " in err and words in err
    assert time.perf_counter() - started < 5  # no model was looked for: the image failed first


def test_ask_takes_the_pixel_limit_flag(tmp_path, capsys):
    photo = big_jpeg(tmp_path / "12mp.jpg")
    assert main(["ask", "--image", str(photo), "--max-image-megapixels", "10", "hi"]) == 2
    assert "4000x3000 = 12.0 megapixels, above the limit of 10" in capsys.readouterr().err


def test_chat_reports_a_bad_image_and_goes_on(tiny_dir, bad_images, colour_images):
    bomb, red = bad_images["bomb 30000x30000"][0], colour_images["red"]
    session = ChatSession(load_pretrained(tiny_dir), settings=GenerationSettings(max_new_tokens=3))
    out = io.StringIO()
    run_chat(session, io.StringIO(f"/image {bomb}\n/image {red}\nwhat colour is it?\n/quit\n"), out)
    assert f"error: {bomb}: the image has more than 179 megapixels" in out.getvalue()
    assert f"(image {red} loaded; new conversation)" in out.getvalue()  # the next image and question work
    assert session.image_embeds is not None and session.conversation.turns[0][1] is not None


def test_training_and_eval_processors_name_the_file(bad_images):
    """Training batches and eval's embedding cache both open images through ImageProcessor."""
    processor = ImageProcessor(preset("tiny").vision)
    for case in ("bomb 12000x12000", "truncated PNG"):
        path, words = bad_images[case]
        with pytest.raises(ImageError, match=words) as e:
            processor([str(path)])
        assert str(path) in str(e.value)


def test_web_demo_routes_uploads_through_open_image(tiny_dir, bad_images, colour_images):
    pytest.importorskip("gradio")
    from tinygptv.serve.web_demo import DemoBackend

    backend = DemoBackend(load_pretrained(tiny_dir))
    *_, status, session = backend.on_image(str(bad_images["bomb 30000x30000"][0]))
    assert status.startswith("Image refused: ") and "179 megapixels" in status and session.image_embeds is None
    *_, status, session = backend.on_image(colour_images["blue"])
    assert status.startswith("Image loaded") and session.image_embeds is not None
    *_, last = backend.respond("what colour is it?", "none", 0.0, 0.9, 1, 3, colour_images["blue"], [], session)
    assert last[3].startswith("Turn 1 answered")
