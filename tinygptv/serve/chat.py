# The main job, `tinygptv ask` and `tinygptv chat`: one image, a conversation in the model's template, answers
# streamed as they are generated. The image is encoded once and its embeddings reused on every turn.
from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import Callable, Iterator, TextIO

import torch

from tinygptv.data.image_file import DEFAULT_MAX_PIXELS
from tinygptv.data.image_processor import ImageProcessor
from tinygptv.data.templates import TEMPLATES, Conversation, inference_template, with_task
from tinygptv.model.generation import GenerationSettings, PromptTooLong, check_utf8
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
        """Forget the conversation; the image stays."""
        self.conversation = Conversation(self.template, end_sym=self.model.config.prompt.end_sym)

    def set_image(self, image) -> None:
        """A new image (a path or a PIL image) and a new conversation about it."""
        pixels = self.processor(image)
        with torch.inference_mode():
            self.image_embeds = self.model.encode_image(pixels)
        self.reset()

    def drop_image(self) -> None:
        """Text-only from now on, in a new conversation."""
        self.image_embeds = None
        self.reset()

    def ask(self, question: str, task: str | None = None, on_text: Callable[[str], None] | None = None) -> str:
        """The answer to `question` in this conversation. Interrupted (Ctrl-C), the part already shown stays in the
        conversation as the answer, so the next question follows what the user saw; a failure drops the question."""
        check_utf8(question, "the question")  # bytes that were not UTF-8 (argv, stdin): the tokenizer cannot take them
        first = not self.conversation.turns
        self.conversation.add_user(with_task(question, task), with_image=first and self.image_embeds is not None)
        images = [self.image_embeds[0] if self.image_embeds is not None else None]
        prompt = self.conversation.prompt()
        try:  # before any generation: a prompt too long is refused, the conversation goes on without it
            self.model.check_prompt_length(prompt, self.settings.max_new_tokens, self.max_prompt_tokens)
        except ValueError:
            self.conversation.drop_question()
            raise
        shown: list[str] = []

        def show(text: str) -> None:
            shown.append(text)
            if on_text is not None:
                on_text(text)

        try:
            if self.settings.num_beams > 1:  # transformers cannot stream beam search: one piece
                show(self.model.generate(None, [prompt], image_embeds=images, settings=self.settings)[0])
                answer = shown[0]
            else:  # closing the stream (also on Ctrl-C) stops the generation before this returns
                with contextlib.closing(stream_generate(self.model, None, prompt, self.settings,
                                                        image_embeds=images, on_text=show)) as pieces:
                    answer = "".join(pieces).strip()
        except KeyboardInterrupt:
            partial = "".join(shown).strip()
            if partial:
                self.conversation.add_answer(partial)
            else:
                self.conversation.drop_question()
            raise
        except BaseException:
            self.conversation.drop_question()
            raise
        self.conversation.add_answer(answer)
        return answer


COMMANDS = {
    "/image PATH": "load an image and start a new conversation about it",
    "/noimage": "drop the image: text-only questions, new conversation",
    "/reset": "forget the conversation (the image stays)",
    "/help": "this list",
    "/quit": "leave (also Ctrl-D); Ctrl-C stops an answer",
}
HELP = "commands: " + "; ".join(f"{name} {what}" for name, what in COMMANDS.items())


@contextlib.contextmanager
def typing_hidden(stdin: TextIO) -> Iterator[None]:
    """While an answer streams, keys typed into a terminal are not echoed into it, and are discarded when it ends
    (they were typed before the prompt was shown). Pipes and files are left alone."""
    try:
        import termios  # POSIX only

        fd = stdin.fileno()
        if not os.isatty(fd):
            raise OSError("not a terminal")
        before = termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError, AttributeError, io.UnsupportedOperation):  # a pipe, a file, a test
        yield
        return
    quiet = list(before)
    quiet[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcflush(fd, termios.TCIFLUSH)
        termios.tcsetattr(fd, termios.TCSANOW, before)


def run_chat(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, task: str | None = None):
    """A line-based loop, so it works the same in a terminal, a pipe and a test. Ctrl-C stops the answer being
    generated (the conversation goes on); at the prompt it only clears the line."""
    if hasattr(stdin, "reconfigure"):  # a line with bytes that are not UTF-8 becomes an error message, not an exit
        stdin.reconfigure(errors="surrogateescape")

    def say(text: str) -> None:
        print(text, file=stdout, flush=True)

    say(HELP)
    while True:
        print("you> ", end="", file=stdout, flush=True)
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            say("\n(Ctrl-D or /quit to leave)")
            continue
        except UnicodeDecodeError:
            say("\nerror: that line is not valid UTF-8 text; type it again")
            continue
        if not line:
            say("")
            return
        line = line.strip()
        if not line:
            continue
        command, _, argument = line.partition(" ")
        if command in ("/quit", "/exit"):
            return
        if command == "/help":
            say("\n".join(f"  {name:<12} {what}" for name, what in COMMANDS.items()))
        elif command == "/reset":
            session.reset()
            say("(conversation reset; the image stays: /noimage drops it)")
        elif command == "/noimage":
            session.drop_image()
            say("(no image: text-only questions, new conversation)")
        elif command == "/image":
            path = argument.strip()
            if not path:
                say("usage: /image PATH")
                continue
            try:
                session.set_image(path)
                say(f"(image {path} loaded; new conversation)")
            except (OSError, ValueError) as e:
                say(f"error: {e}")
        elif command.startswith("/"):
            say(f"unknown command {command}; {HELP}")
        else:
            print("tinygptv> ", end="", file=stdout, flush=True)
            try:
                with typing_hidden(stdin):
                    session.ask(line, task=task, on_text=lambda t: print(t, end="", file=stdout, flush=True))
                say("")
            except KeyboardInterrupt:
                say(" (stopped)")
            except ValueError as e:
                hint = "; /reset starts a new conversation" if isinstance(e, PromptTooLong) else ""
                say(f"error: {e}{hint}")
