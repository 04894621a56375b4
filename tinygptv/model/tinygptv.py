# The composite model: vision tower -> ln_vision + Q-Former -> projector -> image embeddings spliced into the LLM's
# input at each <ImageHere>. One path serves training (loss on the answer span) and generation.
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from transformers import StoppingCriteriaList
from transformers.modeling_outputs import CausalLMOutput

from tinygptv.config import TinyGPTVConfig
from tinygptv.data.templates import IMAGE_PLACEHOLDER
from tinygptv.model.generation import GenerationSettings, PromptTooLong, check_utf8, cut_at_stop
from tinygptv.model.llm import LLM_ADAPTERS, build_llm
from tinygptv.model.lora import add_lora, is_lora_param, merge_lora
from tinygptv.model.projector import Projector
from tinygptv.model.qformer import QFormerConnector
from tinygptv.model.stopping import RepeatGuard
from tinygptv.model.vision import build_vision_tower

IGNORE_INDEX = -100


@dataclass
class ModelInputs:
    inputs_embeds: torch.Tensor  # [B, L, D]
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor | None = None  # [B, L], IGNORE_INDEX outside the answer span


class TinyGPTV(nn.Module):
    """Knows nothing of files, datasets or training loops: it turns (pixels, prompt text, optional answers) into a
    loss or into generated text. The tokenizer travels with the model because splicing needs it. Reading and writing
    model folders is tinygptv.checkpoint's job (load_pretrained / save_pretrained)."""

    def __init__(self, config: TinyGPTVConfig, tokenizer=None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.visual_encoder = build_vision_tower(config.vision)
        self.connector = QFormerConnector(config.qformer, self.visual_encoder.num_features)
        self.projector = Projector(config.qformer.hidden_size, config.projector.hidden_size, config.llm.hidden_size)
        self.llm = add_lora(build_llm(config.llm), config.lora)
        self.freeze_as_official()

    def merge_lora(self) -> "TinyGPTV":
        """Fold LoRA into the LLM weights (config.lora.r becomes 0): the same outputs, no adapter cost."""
        if self.config.lora.r > 0:
            merge_lora(self.llm)
            self.config.lora.r = 0
            self.freeze_as_official()
        return self

    # --- which weights train ----------------------------------------------------------------------------------------

    def trainable_names(self) -> set[str]:
        """TinyGPT-V's trainable set: both projections, the LLM's norm weights and LoRA. The vision tower, ln_vision,
        the Q-Former, every pretrained LLM weight and every norm bias stay frozen."""
        norms = LLM_ADAPTERS[self.config.llm.name].trainable_norms
        names = set()
        for name, _ in self.named_parameters():
            if name.startswith("projector.") or is_lora_param(name):
                names.add(name)
            elif name.startswith("llm.") and name.endswith(norms):
                names.add(name)
        return names

    def freeze_as_official(self) -> None:
        trainable = self.trainable_names()
        for name, param in self.named_parameters():
            param.requires_grad_(name in trainable)
        self.visual_encoder.eval()

    # --- the data path ----------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.projector.llama_proj.weight.device

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values [B, 3, S, S] -> image embeddings [B, Q, D_llm]
        return self.embed_vision_tokens(self.visual_encoder(pixel_values.to(self.device)))

    def embed_vision_tokens(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """The part after the frozen tower ([B, N, Dv] -> [B, Q, D_llm]), separate so a trainer can reuse tower
        outputs it has cached."""
        queries = self.connector(image_tokens)  # [B, Q, Dq]
        return self.projector(queries).to(self.llm_dtype)

    @property
    def llm_dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    def embed_ids(self, ids: Sequence[int]) -> torch.Tensor:
        ids_t = torch.tensor(list(ids), dtype=torch.long, device=self.device)
        return self.llm.get_input_embeddings()(ids_t)  # [T, D]

    def tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer; load it with tinygptv.load_model or load_pretrained, or "
                               "pass one to TinyGPTV")
        check_utf8(text, "the text")  # the tokenizer would raise a TypeError that names nothing
        return self.tokenizer(text, add_special_tokens=False).input_ids

    # --- prompt length ----------------------------------------------------------------------------------------------

    def prompt_tokens(self, prompt: str, image_tokens: int | None = None) -> int:
        """The positions the LLM reads for `prompt` at inference: BOS when the model adds one, the text's tokens, and
        the image's query tokens at each <ImageHere> (image_tokens: the embeddings' length, if not the config's)."""
        pieces = prompt.split(IMAGE_PLACEHOLDER)
        queries = self.config.qformer.num_query_tokens if image_tokens is None else image_tokens
        count = int(self.config.prompt.bos_at_inference) + queries * (len(pieces) - 1)
        return count + sum(len(self.tokenize(piece)) for piece in pieces if piece)

    def check_prompt_length(self, prompt: str, max_new_tokens: int, limit: int | None = None) -> int:
        """prompt_tokens(prompt), or PromptTooLong when it exceeds the room the context leaves for max_new_tokens
        (and `limit`, a caller's own bound). A text longer than that room times the longest token is refused without
        tokenizing it: no token covers more characters, so it cannot fit, and tokenizing megabytes takes seconds."""
        context = self.config.llm.max_position_embeddings
        allowed = context - max_new_tokens if limit is None else min(context - max_new_tokens, limit)
        if allowed > 0 and len(prompt) <= allowed * self._longest_token():
            tokens = self.prompt_tokens(prompt)
            if tokens <= allowed:
                return tokens
        else:
            tokens = None
        raise PromptTooLong(tokens, allowed, context, max_new_tokens, limit)

    def _longest_token(self) -> int:
        """Characters in the vocabulary's longest entry (for byte-level BPE: bytes, never fewer than characters)."""
        if getattr(self, "_longest", None) is None:
            self._longest = max((len(t) for t in self.tokenizer.get_vocab()), default=1)
        return self._longest

    def build_inputs(
        self,
        prompts: Sequence[str],
        image_embeds: Sequence[torch.Tensor] | torch.Tensor | None = None,
        answers: Sequence[str | Sequence[tuple[str, bool]]] | None = None,
        *,
        add_bos: bool = True,
        padding_side: str = "right",
    ) -> ModelInputs:
        """Split each prompt at <ImageHere>, embed the text pieces, splice the sample's images in order, then append
        the answer (+ end_sym, cut at max_txt_len tokens) whose tokens alone carry labels. With add_bos the sequence
        starts with one <|endoftext|> embedding, as in the official training.

        An answer may also be a list of (text, supervised) segments for multi-turn samples: answer turns (with their
        end_sym already added) are supervised, follow-up questions are not; the whole tail is cut at max_txt_len."""
        cfg = self.config
        n = len(prompts)
        if answers is not None and len(answers) != n:
            raise ValueError(f"{n} prompts but {len(answers)} answers")
        images = _per_sample_images(image_embeds, n)
        pad_id = cfg.llm.pad_token_id
        rows, labels = [], []
        for i, prompt in enumerate(prompts):
            pieces = prompt.split(IMAGE_PLACEHOLDER)
            sample_images = images[i]
            if len(pieces) - 1 != len(sample_images):
                raise ValueError(
                    f"prompt {i} has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholder(s) but {len(sample_images)} "
                    f"image(s) were given: {prompt!r}"
                )
            parts = [self.embed_ids([cfg.llm.bos_token_id])] if add_bos else []
            for j, piece in enumerate(pieces):
                if piece:
                    parts.append(self.embed_ids(self.tokenize(piece)))
                if j < len(sample_images):
                    parts.append(sample_images[j].to(self.device, self.llm_dtype))
            prompt_len = sum(p.shape[0] for p in parts)
            label = [IGNORE_INDEX] * prompt_len
            if answers is not None:
                answer_ids, answer_labels = self._answer_tokens(answers[i])
                if answer_ids:
                    parts.append(self.embed_ids(answer_ids))
                label += answer_labels
            rows.append(torch.cat(parts, dim=0))
            labels.append(label)
        return self._pad(rows, labels if answers is not None else None, pad_id, padding_side)

    def _answer_tokens(self, answer) -> tuple[list[int], list[int]]:
        segments = [(answer + self.config.prompt.end_sym, True)] if isinstance(answer, str) else answer
        ids: list[int] = []
        labels: list[int] = []
        for text, supervised in segments:
            seg = self.tokenize(text)
            ids += seg
            labels += seg if supervised else [IGNORE_INDEX] * len(seg)
        cut = self.config.prompt.max_txt_len
        return ids[:cut], labels[:cut]

    def _pad(self, rows, labels, pad_id: int, side: str) -> ModelInputs:
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {side!r}")
        longest = max(r.shape[0] for r in rows)
        pad_embed = self.embed_ids([pad_id])  # [1, D]: the official code pads with the pad token's embedding
        embeds, masks, label_rows = [], [], []
        for i, row in enumerate(rows):
            missing = longest - row.shape[0]
            pad = pad_embed.expand(missing, -1)
            mask = torch.ones(row.shape[0], dtype=torch.long, device=self.device)
            zeros = torch.zeros(missing, dtype=torch.long, device=self.device)
            if side == "right":
                embeds.append(torch.cat([row, pad]))
                masks.append(torch.cat([mask, zeros]))
            else:
                embeds.append(torch.cat([pad, row]))
                masks.append(torch.cat([zeros, mask]))
            if labels is not None:
                fill = [IGNORE_INDEX] * missing
                label_rows.append(labels[i] + fill if side == "right" else fill + labels[i])
        label_tensor = None
        if labels is not None:
            label_tensor = torch.tensor(label_rows, dtype=torch.long, device=self.device)
        return ModelInputs(torch.stack(embeds), torch.stack(masks), label_tensor)

    def forward(
        self,
        pixel_values: torch.Tensor | None,
        prompts: Sequence[str],
        answers: Sequence[str | Sequence[tuple[str, bool]]] | None = None,
        *,
        image_embeds: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
        return_logits: bool = False,
    ) -> CausalLMOutput:
        """Training / scoring path. The loss is the mean cross-entropy over the answer tokens, and the vocabulary
        projection runs only at those positions (a third of a small LM's compute otherwise goes to logits nobody
        reads); return_logits=True also returns the full [B, L, V] logits. Pass image_embeds instead of
        pixel_values when only some samples have an image."""
        if image_embeds is None and pixel_values is not None:
            image_embeds = self.encode_image(pixel_values)
        inputs = self.build_inputs(prompts, image_embeds, answers, add_bos=True, padding_side="right")
        hidden = self.llm.model(inputs_embeds=inputs.inputs_embeds,
                                attention_mask=inputs.attention_mask).last_hidden_state  # [B, L, D]
        head = self.llm.get_output_embeddings()
        loss = None
        if inputs.labels is not None:
            targets = inputs.labels[:, 1:]  # position t predicts token t + 1
            keep = targets != IGNORE_INDEX
            logits_kept = head(hidden[:, :-1][keep])  # [T, V]
            loss = torch.nn.functional.cross_entropy(logits_kept.float(), targets[keep])
        return CausalLMOutput(loss=loss, logits=head(hidden) if return_logits else None)

    @torch.inference_mode()
    def generate(
        self,
        pixel_values: torch.Tensor | None,
        prompts: Sequence[str],
        *,
        image_embeds: torch.Tensor | Sequence[torch.Tensor] | None = None,
        settings: GenerationSettings | None = None,
        streamer=None,
        stopping_criteria=None,
        **changes,
    ) -> list[str]:
        """Greedy, sampling or beam search (GenerationSettings; keyword arguments such as max_new_tokens=40 change
        single fields) with the KV cache of transformers' generate(). Prompts are left-padded so a batch decodes
        together. Each answer is cut at the first stop string (default end_sym). stopping_criteria (transformers'
        StoppingCriteria) end rows early: a server's time limit, a client that went away; settings.max_repeats adds
        the repetition guard."""
        settings = (settings or GenerationSettings()).replace(**changes)
        if image_embeds is None and pixel_values is not None:
            image_embeds = self.encode_image(pixel_values)
        inputs = self.build_inputs(
            prompts, image_embeds, add_bos=self.config.prompt.bos_at_inference, padding_side="left"
        )
        end_sym = self.config.prompt.end_sym
        stopping = StoppingCriteriaList(stopping_criteria or [])
        if settings.max_repeats:
            stopping.append(RepeatGuard(settings.max_repeats))
        out = self.llm.generate(  # [B, new tokens]: with inputs_embeds only the new tokens come back
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            streamer=streamer,
            stopping_criteria=stopping,
            **settings.generate_kwargs(self.config.llm, self.tokenizer, end_sym),
        )
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return [cut_at_stop(t, settings.stops(end_sym)).strip() for t in texts]


def component_of(name: str, added_norms: tuple[str, ...]) -> str:
    """Which part of the data path a parameter belongs to (added_norms: the LLM adapter's), for counts and tune."""
    if name.startswith("visual_encoder."):
        return "vision"
    if name.startswith("connector.ln_vision."):
        return "ln_vision"
    if name.startswith("connector."):
        return "qformer"
    if name.startswith("projector."):
        return "projector"
    if is_lora_param(name):
        return "lora"
    if any(f".{n}." in name for n in added_norms):
        return "added_norms"
    return "llm"


def _per_sample_images(image_embeds, n: int) -> list[list[torch.Tensor]]:
    """Normalise image input to one list of [Q, D] tensors per sample: a [B, Q, D] tensor is one image per sample,
    a sequence gives each sample its own [k, Q, D] (or [Q, D]) stack, None means text only."""
    if image_embeds is None:
        return [[] for _ in range(n)]
    if isinstance(image_embeds, torch.Tensor):
        if image_embeds.dim() != 3 or image_embeds.shape[0] != n:
            raise ValueError(f"expected image embeddings [B={n}, Q, D], got {tuple(image_embeds.shape)}")
        return [[image_embeds[i]] for i in range(n)]
    if len(image_embeds) != n:
        raise ValueError(f"{n} prompts but images for {len(image_embeds)} samples")
    out = []
    for e in image_embeds:
        if e is None:
            out.append([])
        elif e.dim() == 2:
            out.append([e])
        else:
            out.append(list(e))
    return out
