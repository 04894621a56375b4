# The main job, `tinygptv ask` and `tinygptv chat`: one image, a conversation in the model's template, answers
# streamed as they are generated. The image is encoded once and its embeddings reused on every turn.
from __future__ import annotations

import sys
from typing import Callable, TextIO

import torch

from tinygptv.data.image_file import DEFAULT_MAX_PIXELS
from tinygptv.data.image_processor import ImageProcessor
from tinygptv.data.templates import TEMPLATES, Conversation, inference_template, with_task
from tinygptv.model.generation import GenerationSettings, PromptTooLong, utf8_problem
from tinygptv.model.streaming import stream_generate
from tinygptv.model.tinygptv import TinyGPTV


class ChatSession:
    """One conversation about at most one image. `template` defaults to the model's inference template: the official
    stage-3 demo format for stage-3 models, the training template otherwise."""

    def __init__(self, model: TinyGPTV, template: str | None = None, settings: GenerationSettings | None = None, *,
                 max_prompt_tokens: int | None = None, max_image_pixels: int = DEFAULT_MAX_PIXELS):
        self.model = model
        self.processor = ImageProcessor(model.config.vision, max_pixels=max_image_pixels)
        self.max_prompt_tokens = max_prompt_tokens  # None: what the context leaves after max_new_tokens
        self.template = TEMPLATES[template or inference_template(model.config.prompt.template)]
        self.settings = settings or GenerationSettings()
        self.image_embeds: torch.Tensor | None = None  # [1, Q, D], cached across turns
        self.reset()

    def reset(self) -> None:
        self.conversation = Conversation(self.template, end_sym=self.model.config.prompt.end_sym)

    def set_image(self, image) -> None:
        pixels = self.processor(image)
        with torch.inference_mode():
            self.image_embeds = self.model.encode_image(pixels)
        self.reset()

    def ask(self, question: str, task: str | None = None, on_text: Callable[[str], None] | None = None) -> str:
        problem = utf8_problem(question)  # bytes that were not UTF-8 (argv, stdin): the tokenizer cannot take them
        if problem:
            raise ValueError(f"the question is not valid UTF-8 ({problem})")
        first = not self.conversation.turns
        self.conversation.add_user(with_task(question, task), with_image=first and self.image_embeds is not None)
        images = [self.image_embeds[0] if self.image_embeds is not None else None]
        prompt = self.conversation.prompt()
        try:  # before any generation: a prompt too long is refused, the conversation goes on without it
            self.model.check_prompt_length(prompt, self.settings.max_new_tokens, self.max_prompt_tokens)
        except ValueError:
            self.conversation.turns.pop()
            raise
        if self.settings.num_beams > 1:  # transformers cannot stream beam search: one piece
            answer = self.model.generate(None, [prompt], image_embeds=images, settings=self.settings)[0]
            if on_text is not None:
                on_text(answer)
        else:
            pieces = stream_generate(self.model, None, prompt, self.settings, image_embeds=images, on_text=on_text)
            answer = "".join(pieces).strip()
        self.conversation.add_answer(answer)
        return answer


HELP = "commands: /image PATH (new image, new conversation), /reset (forget the conversation), /quit"


def run_chat(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, task: str | None = None):
    """A line-based loop, so it works the same in a terminal, a pipe and a test."""
    if hasattr(stdin, "reconfigure"):  # a line with bytes that are not UTF-8 becomes an error message, not an exit
        stdin.reconfigure(errors="surrogateescape")
    print(HELP, file=stdout, flush=True)
    while True:
        print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            print(file=stdout)
            return
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            session.reset()
            print("(conversation reset)", file=stdout, flush=True)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                session.set_image(path)
                print(f"(image {path} loaded; new conversation)", file=stdout, flush=True)
            except (OSError, ValueError) as e:
                print(f"error: {e}", file=stdout, flush=True)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {HELP}", file=stdout, flush=True)
            continue
        print("tinygptv> ", end="", file=stdout, flush=True)
        try:
            session.ask(line, task=task, on_text=lambda t: print(t, end="", file=stdout, flush=True))
        except ValueError as e:
            hint = "; /reset starts a new conversation" if isinstance(e, PromptTooLong) else ""
            print(f"error: {e}{hint}", file=stdout, flush=True)
            continue
        print(file=stdout, flush=True)
