# `tinygptv demo`: the main job (one image, a conversation, streamed answers) in a local Gradio page. Each browser tab
# holds its own ChatSession over one shared model; grounding answers are drawn onto the image by serve/draw.py.
from __future__ import annotations

import html
import queue
import threading
import time

import gradio as gr

from tinygptv.data.image_file import DEFAULT_MAX_PIXELS, ImageError, open_image
from tinygptv.data.templates import TASK_TAGS, with_task
from tinygptv.model.generation import GenerationSettings
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.serve.chat import ChatSession
from tinygptv.serve.draw import draw_on

NO_TASK = "none"
BOX_TASKS = ("refer", "grounding", "detection")  # the task tags whose answers carry boxes


class DemoBackend:
    """What the page's events call. The model is not thread-safe, so every use of it takes one lock, on top of the
    queue's concurrency limit of 1: a generation whose browser went away still finishes in its thread, and the next
    request must wait for it."""

    def __init__(self, model: TinyGPTV, template: str | None = None, repetition_penalty: float = 1.0, *,
                 max_prompt_tokens: int | None = None, max_image_pixels: int = DEFAULT_MAX_PIXELS):
        self.model = model
        self.template = template
        self.repetition_penalty = repetition_penalty
        self.max_prompt_tokens, self.max_image_pixels = max_prompt_tokens, max_image_pixels
        self.lock = threading.Lock()

    def new_session(self, image: str | None) -> ChatSession:
        """`image` is the uploaded file's path: it is opened by open_image, as on every other entry point."""
        session = ChatSession(self.model, template=self.template, max_prompt_tokens=self.max_prompt_tokens,
                              max_image_pixels=self.max_image_pixels)
        if image is not None:
            with self.lock:
                session.set_image(image)
        return session

    def on_image(self, image: str | None):
        """A new image (or none) starts a new conversation. Returns chat, boxes, status, session."""
        try:
            session = self.new_session(image)
        except (ImageError, OSError) as e:  # the page says why; questions go on without the image
            return [], None, f"Image refused: {_shown(str(e))}", self.new_session(None)
        status = "Image loaded: a new conversation." if image is not None else "No image: text-only questions."
        return [], None, status, session

    def on_reset(self, image: str | None, session: ChatSession | None):
        if session is None:
            session = self.new_session(image)
        with self.lock:  # not while a generation that outlived its page still writes its answer
            session.reset()  # keeps the encoded image, forgets the turns
        return [], None, "Conversation cleared.", session

    def respond(self, question: str, task: str, temperature: float, top_p: float, num_beams: int,
                max_new_tokens: int, image: str | None, history: list, session: ChatSession | None):
        """A generator for Gradio: yields (chat, question box, boxes image, status, session) as the answer grows."""
        question = question.strip()
        if not question:
            yield history, "", gr.skip(), "Type a question first.", session
            return
        if session is None:
            try:
                session = self.new_session(image)
            except (ImageError, OSError) as e:
                yield history, question, gr.skip(), f"Image refused: {_shown(str(e))}", session
                return
        task = None if task in (None, "", NO_TASK) else task
        session.settings = GenerationSettings(  # the page's controls; temperature 0 is greedy, as on the CLI
            max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
            num_beams=int(num_beams), repetition_penalty=self.repetition_penalty)
        history = history + [{"role": "user", "content": _shown(with_task(question, task))},
                             {"role": "assistant", "content": ""}]
        started = time.perf_counter()
        yield history, "", None, "Generating…", session
        try:
            for answer, finished in self._ask(session, question, task):
                history[-1] = {"role": "assistant", "content": _shown(answer)}
                if not finished:
                    yield history, "", None, "Generating…", session
        except Exception as e:  # the page shows why, the question goes back into its box to be asked again
            yield history[:-2], question, None, f"Generation failed: {_shown(str(e))}", session
            return
        shown = None
        if image is not None and session.image_embeds is not None:  # the upload, upright, as the model saw it
            shown = open_image(image, max_pixels=self.max_image_pixels)
        boxed, drawn = draw_on(shown, answer) if shown is not None else (None, 0)
        took = time.perf_counter() - started
        status = f"Turn {len(history) // 2} answered in {took:.1f} s"
        if drawn:
            status += f"; {drawn} box{'es' if drawn != 1 else ''} drawn."
        elif task in BOX_TASKS:
            status += f"; the answer has no box to draw ({{<x1><y1><x2><y2>}} on a 0-100 grid is what [{task}] asks for)."
        else:
            status += "."
        yield history, "", boxed if drawn else None, status, session

    def _ask(self, session: ChatSession, question: str, task: str | None):
        """Yield (text so far, False) as the answer grows, then (the answer, True). ChatSession.ask runs in a thread
        and hands its on_text pieces over a queue; transformers cannot stream beam search, so with beams the whole
        answer comes at once."""
        pieces: queue.Queue = queue.Queue()
        outcome: list = []  # the answer, or the exception that stopped it

        def work():
            try:
                with self.lock:
                    outcome.append(session.ask(question, task=task, on_text=pieces.put))
            except BaseException as e:  # raised again in the page's thread below (ask took the question back)
                outcome.append(e)
            finally:
                pieces.put(None)

        threading.Thread(target=work, daemon=True).start()
        text = ""
        while (piece := pieces.get()) is not None:
            text += piece
            yield text, False
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        yield outcome[0], True


def _shown(text: str) -> str:
    """Chat text as the page shows it: grounding answers are full of <p> and <12>, which Markdown would eat as HTML."""
    return html.escape(text, quote=False)


def build_demo(model: TinyGPTV, name: str, *, note: str | None = None, template: str | None = None,
               task: str | None = None,
               max_new_tokens: int = 300, temperature: float = 0.0, top_p: float = 0.9, num_beams: int = 1,
               repetition_penalty: float = 1.0, max_prompt_tokens: int | None = None,
               max_image_pixels: int = DEFAULT_MAX_PIXELS) -> gr.Blocks:
    """The page, with one queue that runs one event at a time. `note` (what the model is for) is shown under the
    title; the other keyword arguments are the controls' starting values and the input limits. Every element the
    browser test touches has a stable elem_id."""
    backend = DemoBackend(model, template=template, repetition_penalty=repetition_penalty,
                          max_prompt_tokens=max_prompt_tokens, max_image_pixels=max_image_pixels)
    vision, llm = model.config.vision.name, model.config.llm.name
    with gr.Blocks(title=f"TinyGPT-V demo: {name}", analytics_enabled=False) as demo:
        gr.Markdown(f"## TinyGPT-V demo\nModel: **`{name}`** ({vision} vision tower, {llm} language model). "
                    "Upload an image, pick a task if you like, and ask." + (f"\n\n*{note}*" if note else ""),
                    elem_id="model-name")
        session = gr.State(None)
        with gr.Row():
            with gr.Column(scale=2):
                # the upload's path, not decoded by Gradio (image_mode=None): open_image decodes it under the limits
                image = gr.Image(type="filepath", image_mode=None, label="Image", sources=["upload", "clipboard"],
                                 elem_id="image")
                boxes = gr.Image(type="pil", format="png", label="Boxes in the last answer", interactive=False,
                                 buttons=["download", "fullscreen"], elem_id="boxes")
            with gr.Column(scale=3):
                chat = gr.Chatbot(label="Conversation", height=360, buttons=["copy", "copy_all"], elem_id="chatbot")
                tasks = gr.Radio([("no task tag", NO_TASK)] + [(f"[{t}]", t) for t in TASK_TAGS],
                                 value=task or NO_TASK, label="Task tag (prepended to the question)", elem_id="task")
                question = gr.Textbox(label="Question", placeholder="What is in the image?", lines=1,
                                      elem_id="question")
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    reset = gr.Button("Clear conversation", elem_id="reset")
                status = gr.Markdown("Ready.", elem_id="status")
                with gr.Accordion("Generation", open=False):
                    temp = gr.Slider(0.0, max(2.0, temperature), value=temperature, step=0.05,
                                     label="temperature (0 = greedy)", elem_id="temperature")
                    nucleus = gr.Slider(0.05, 1.0, value=top_p, step=0.05, label="top-p (when sampling)",
                                        elem_id="top-p")
                    beams = gr.Slider(1, max(5, num_beams), value=num_beams, step=1,
                                      label="beams (> 1: no streaming)", elem_id="beams")
                    length = gr.Slider(1, max(1024, max_new_tokens), value=max_new_tokens, step=1,
                                       label="max new tokens", elem_id="max-new-tokens")

        image.change(backend.on_image, [image], [chat, boxes, status, session])
        reset.click(backend.on_reset, [image, session], [chat, boxes, status, session])
        chat.clear(backend.on_reset, [image, session], [chat, boxes, status, session])  # the chat's own bin icon
        inputs = [question, tasks, temp, nucleus, beams, length, image, chat, session]
        outputs = [chat, question, boxes, status, session]
        ask.click(backend.respond, inputs, outputs)
        question.submit(backend.respond, inputs, outputs)
    demo.queue(default_concurrency_limit=1)
    return demo
