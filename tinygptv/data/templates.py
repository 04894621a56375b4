# Prompt templates of the official stages (training, demo and benchmark formats) and the conversation they build. The text they produce
# carries <ImageHere>, where the model later splices the image embeddings. Data path: question -> template -> prompt.
from __future__ import annotations

from dataclasses import dataclass, field

from tinygptv.registry import Registry

IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_PROMPT = "<Img><ImageHere></Img> {}"  # how every image instruction is written in official training
TASK_TAGS = ("vqa", "caption", "refer", "identify", "grounding", "detection")


@dataclass(frozen=True)
class Template:
    """`turn` wraps one user message; an answer follows it, closed by the stop string (`end_sym`) in multi-turn text.
    `system` precedes the first turn."""

    turn: str
    system: str = ""


TEMPLATES: Registry[Template] = Registry("template")
# Stages 1-2 have no instruction: the sequence is [BOS] [image] caption.
TEMPLATES.register("none", Template(turn="{}"))
# Stage 3 training and the official stage 1-3 chat (the demo adds a system line, kept as "stage3-demo").
TEMPLATES.register("stage3", Template(turn="###Human: {} ###Assistant: "))
TEMPLATES.register("stage3-demo", Template(
    turn="###Human: {}###Assistant: ",
    system="Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide it "
           "to you. Please answer my questions.",
))
# Stage 4 training and the stage-4 demo (whose literal "<s>" we drop: it is plain text to Phi, and training never saw it).
TEMPLATES.register("stage4", Template(turn="[INST] {} [/INST]"))
# The official benchmark scripts (eval_vqa.py / eval_ref.py), whatever the stage.
TEMPLATES.register("eval", Template(turn="###Human: {}###Assistant: "))
# ChatML, the format SmolLM2-Instruct (the `nano` preset's LLM) was tuned on; end_sym "<|im_end|>\n" closes each answer,
# so a multi-turn prompt is exactly its chat template (minus the default system line).
TEMPLATES.register("chatml", Template(turn="<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"))


def inference_template(trained_with: str) -> str:
    """The template to ask a model in, from the one it was trained with: the official stage-3 demo format for stage
    1-3 models (as the official chat asks them), the training template otherwise."""
    return {"stage3": "stage3-demo", "none": "stage3-demo"}.get(trained_with, trained_with)


def with_task(question: str, task: str | None) -> str:
    if not task:
        return question
    if task not in TASK_TAGS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASK_TAGS)}")
    return f"[{task}] {question}"


@dataclass
class Conversation:
    """A multi-turn exchange rendered into one prompt. Only the first user turn carries the image, as in the
    official chat."""

    template: Template
    end_sym: str = "###"
    turns: list[tuple[str, str | None]] = field(default_factory=list)  # (user text, answer or None)

    def add_user(self, text: str, with_image: bool) -> None:
        if self.turns and self.turns[-1][1] is None:
            raise ValueError("the previous question has no answer yet")
        self.turns.append((IMAGE_PROMPT.format(text) if with_image else text, None))

    def drop_question(self) -> None:
        """Take back the last question if it has no answer (its generation failed or was stopped)."""
        if self.turns and self.turns[-1][1] is None:
            self.turns.pop()

    def add_answer(self, text: str) -> None:
        if not self.turns or self.turns[-1][1] is not None:
            raise ValueError("no question is waiting for an answer")
        self.turns[-1] = (self.turns[-1][0], text)

    def prompt(self) -> str:
        parts = [self.template.system]
        for user, answer in self.turns:
            parts.append(self.template.turn.format(user))
            if answer is not None:
                parts.append(answer + self.end_sym)
        return "".join(parts)


def single_prompt(template: str, question: str, with_image: bool = True, task: str | None = None) -> str:
    conv = Conversation(TEMPLATES[template])
    conv.add_user(with_task(question, task), with_image)
    return conv.prompt()
