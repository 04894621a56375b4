# What a quantization mode costs in answers: the same fixed prompts teacher-forced through the model before and after
# quantizing -> [next-token distributions at every answer position] -> top-1 agreement and mean KL.
from __future__ import annotations

from dataclasses import dataclass

import torch

from tinygptv.data.datasets.scenes import shape_box, vqa_pairs
from tinygptv.data.image_processor import ImageProcessor
from tinygptv.data.scenes import draw_scene, make_scene
from tinygptv.data.templates import single_prompt
from tinygptv.model.tinygptv import IGNORE_INDEX

TEXT_ONLY = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Write one sentence about the sea.", "The sea is wide, deep and always moving."),
    ("What is two plus three?", "Two plus three is five."),
)


@dataclass
class QualityReport:
    positions: int
    top1_agreement: float  # fraction of answer positions where both models rank the same token first
    mean_kl: float  # KL(reference || quantized) in nats, averaged over the positions

    def to_dict(self) -> dict:
        return {"positions": self.positions, "top1_agreement": self.top1_agreement, "mean_kl": self.mean_kl}


def prompt_set(template: str, n_scenes: int = 6) -> list[tuple[object, str, str]]:
    """(image or None, prompt, answer): questions about held-out synthetic scenes (drawn in memory, so nothing is
    read from disk) and a few text-only turns. Fixed, so every mode is scored on the same tokens."""
    items = []
    for index in range(n_scenes):
        shapes = make_scene(0, "test", index)
        image = draw_scene(shapes)
        pairs = vqa_pairs(shapes)
        question, answer = pairs[index % len(pairs)]
        items.append((image, single_prompt(template, question, task="vqa"), answer))
        items.append((image, single_prompt(template, f"the {shapes[0].name}", task="refer"), shape_box(shapes[0])))
    items += [(None, single_prompt(template, q, with_image=False), a) for q, a in TEXT_ONLY]
    return items


@torch.inference_mode()
def answer_logits(model, items) -> list[torch.Tensor]:
    """[T_i, V] fp32 logits predicting each answer token, one tensor per item."""
    processor = ImageProcessor(model.config.vision)
    out = []
    for image, prompt, answer in items:
        embeds = [model.encode_image(processor([image]))[0]] if image is not None else [None]
        inputs = model.build_inputs([prompt], embeds, [answer], add_bos=model.config.prompt.bos_at_inference)
        logits = model.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask).logits
        keep = inputs.labels[0, 1:] != IGNORE_INDEX
        out.append(logits[0, :-1][keep].float().cpu())
    return out


def compare(reference: list[torch.Tensor], quantized: list[torch.Tensor]) -> QualityReport:
    ref, q = torch.cat(reference), torch.cat(quantized)
    log_p, log_q = ref.log_softmax(-1), q.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return QualityReport(positions=ref.shape[0], top1_agreement=(ref.argmax(-1) == q.argmax(-1)).float().mean().item(),
                         mean_kl=kl.mean().item())
