# The web demo (`tinygptv demo`, serve/web_demo.py) driven by a real headless browser: Debian's chromium through
# selenium, against the bundled nano model on a loopback port. The page must ask exactly what ChatSession would.
from __future__ import annotations

import argparse
import html
import io
import shutil
import socket
import threading
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from tinygptv.model.generation import GenerationSettings
from tinygptv.serve.chat import ChatSession
from tinygptv.serve.draw import boxes_in, draw_on

ROOT = Path(__file__).resolve().parent.parent
RED_CIRCLE = ROOT / "examples" / "red_circle.png"
pytestmark = pytest.mark.slow  # a browser, a server and the nano model

MODEL = "tinygptv-nano"
MAX_NEW_TOKENS = 12  # the page's starting value; short answers keep the test quick
WAIT_S = 60
GROUNDED = "<p>red circle</p> {<25><25><75><75>}"  # what the fake model answers in the grounding test


def _browser_paths() -> tuple[str, str]:
    """Debian's chromium and its driver (`make browser` installs both; CI runs it before the tests)."""
    found = [shutil.which(name) or f"/usr/bin/{name}" for name in ("chromium", "chromedriver")]
    missing = [path for path in found if not Path(path).is_file()]
    if missing:
        pytest.fail(f"the browser test needs Debian's chromium and chromium-driver ({', '.join(missing)} not found); "
                    "install them with `make browser` (as root; CI does this through `make test`)", pytrace=False)
    return found[0], found[1]


@pytest.fixture(scope="module")
def page_url(nano):
    """The demo in a background thread of this process (so a test can swap the model's answers), loopback only."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        from tinygptv.serve.web_demo import build_demo

        demo = build_demo(nano, MODEL, max_new_tokens=MAX_NEW_TOKENS)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        demo.launch(server_name="127.0.0.1", server_port=port, share=False, prevent_thread_lock=True, quiet=True)
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            demo.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _by_css(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def _wait_for(driver, what: str, condition) -> None:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(lambda d: condition())
    except TimeoutException:
        status = _by_css(driver, "#status")
        raise AssertionError(f"the page never showed {what} in {WAIT_S} s; status line: "
                             f"{status[0].text if status else '(none)'!r}") from None


def _status(driver) -> str:
    return _by_css(driver, "#status")[0].text


def _open_with_image(driver, url: str) -> None:
    driver.get(url)
    _wait_for(driver, "the model's name", lambda: MODEL in "".join(e.text for e in _by_css(driver, "#model-name")))
    _by_css(driver, "#image input[type=file]")[0].send_keys(str(RED_CIRCLE))
    _wait_for(driver, "the uploaded image", lambda: _status(driver).startswith("Image loaded"))


def _ask(driver, question: str, task: str | None = None) -> str:
    """Ask through the page and return the answer as it shows it, once the status line says it is complete."""
    turn = len(_by_css(driver, "#chatbot [data-testid=bot]")) + 1
    if task:
        _by_css(driver, f"#task input[value='{task}']")[0].find_element("xpath", "..").click()
    _by_css(driver, "#question textarea")[0].send_keys(question)
    _by_css(driver, "#ask")[0].click()
    _wait_for(driver, f"answer {turn}", lambda: _status(driver).startswith(f"Turn {turn} answered"))
    bots = _by_css(driver, "#chatbot [data-testid=bot]")
    assert len(bots) == turn
    return " ".join(bots[-1].text.split())


def _boxes_image(driver) -> Image.Image | None:
    shown = _by_css(driver, "#boxes img")
    if not shown:
        return None
    with urllib.request.urlopen(shown[0].get_attribute("src"), timeout=10) as response:
        return Image.open(io.BytesIO(response.read())).convert("RGB")


def test_page_asks_what_chat_session_asks(page_url, browser, nano, tmp_path):
    """Two turns, the second with the [grounding] tag: the page's answers are ChatSession's, greedy, same image."""
    _open_with_image(browser, page_url)
    first = _ask(browser, "What color is the shape?")
    second = _ask(browser, "the shape", task="grounding")

    expected = ChatSession(nano, settings=GenerationSettings(max_new_tokens=MAX_NEW_TOKENS))
    expected.set_image(RED_CIRCLE)
    want = [expected.ask("What color is the shape?"), expected.ask("the shape", task="grounding")]
    assert [first, second] == [" ".join(w.split()) for w in want]
    users = [" ".join(e.text.split()) for e in _by_css(browser, "#chatbot [data-testid=user]")]
    assert users == ["What color is the shape?", "[grounding] the shape"]
    # the boxes panel shows an image exactly when the answer has a box (the nano model rarely gives one)
    assert (_boxes_image(browser) is not None) == bool(boxes_in(want[1]))

    shot = tmp_path / "demo.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    with Image.open(shot) as image:
        assert len(image.convert("L").getcolors(1 << 16) or ()) > 16  # a rendered page, not a blank one


def test_grounding_answer_is_drawn_and_reset_clears(page_url, browser, monkeypatch, tmp_path):
    """A model that always answers with a box (the page, not the model, is under test): the task tag and question
    reach ChatSession.ask, the answer's <p> and <12> show as text, and the boxes panel holds draw_on's image."""
    seen = []

    def fake_ask(session, question, task=None, on_text=None):
        seen.append((question, task, session.image_embeds is not None))
        for piece in ("<p>red circle</p> ", "{<25><25>", "<75><75>}"):
            on_text(piece)
        return GROUNDED

    monkeypatch.setattr(ChatSession, "ask", fake_ask)
    _open_with_image(browser, page_url)
    assert _ask(browser, "the red circle", task="grounding") == GROUNDED
    assert seen == [("the red circle", "grounding", True)]
    assert "1 box drawn" in _status(browser)
    drawn = _boxes_image(browser)
    assert drawn is not None, "the answer has a box but the boxes panel is empty"
    with Image.open(RED_CIRCLE) as original:
        want, count = draw_on(original, GROUNDED)
    assert count == 1 and drawn.size == want.size and drawn.tobytes() == want.tobytes()
    assert browser.save_screenshot(str(tmp_path / "grounding.png"))  # for a person to look at when it fails

    _by_css(browser, "#reset")[0].click()
    _wait_for(browser, "the cleared conversation", lambda: _status(browser).startswith("Conversation cleared"))
    assert not _by_css(browser, "#chatbot [data-testid=bot]") and _boxes_image(browser) is None


def test_answers_stream_and_beams_answer_at_once(nano, monkeypatch):
    """No browser, the page's generator itself: a piece of the answer reaches the page while ChatSession.ask is still
    running; with beams (which transformers cannot stream) the answer is TinyGPTV.generate's, in one piece."""
    from tinygptv.data.image_processor import ImageProcessor
    from tinygptv.data.templates import inference_template, single_prompt
    from tinygptv.serve.web_demo import DemoBackend

    backend = DemoBackend(nano)
    image = str(RED_CIRCLE)  # the page hands over the upload's path
    question = "What color is the shape?"

    shown_before_done = []
    release = threading.Event()

    def slow_ask(session, question, task=None, on_text=None):
        on_text("first ")
        shown_before_done.append(release.wait(WAIT_S))  # set by the test once the page has yielded "first "
        on_text("second")
        return "first second"

    with monkeypatch.context() as patch:
        patch.setattr(ChatSession, "ask", slow_ask)
        steps = backend.respond(question, "none", 0.0, 0.9, 1, MAX_NEW_TOKENS, image, [], None)
        assert next(steps)[3] == "Generating…"
        assert next(steps)[0][-1]["content"] == "first "
        release.set()
        *_, last = steps
    assert shown_before_done == [True] and last[0][-1]["content"] == "first second"

    *_, session = backend.on_image(image)
    steps = list(backend.respond(question, "none", 0.0, 0.9, 2, MAX_NEW_TOKENS, image, [], session))
    assert steps[-1][3].startswith("Turn 1 answered")
    prompt = single_prompt(inference_template(nano.config.prompt.template), question)
    want = nano.generate(ImageProcessor(nano.config.vision)(image), [prompt], max_new_tokens=MAX_NEW_TOKENS,
                         num_beams=2)[0]
    shown = {step[0][-1]["content"] for step in steps if step[0] and step[0][-1]["role"] == "assistant"}
    assert shown - {""} == {html.escape(want, quote=False)}  # the whole answer at once, never a part of it


def test_demo_command_listens_on_loopback_by_default():
    from tinygptv.serve.demo_cli import add_demo_parser

    parser = argparse.ArgumentParser(prog="tinygptv")
    add_demo_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo"])
    assert (args.host, args.port, args.share, args.model) == ("127.0.0.1", 7860, False, MODEL)
