# The training step's forward pass as one module: vision tower (or its cached output) -> Q-Former -> projection ->
# LLM loss. DDP and FSDP wrap this module, so every weight a step uses is used inside the wrapped forward (FSDP
# gathers a shard's weights in its owner's forward hooks). Data path: Batch -> [this] -> loss -> the loop.
from __future__ import annotations

import torch
from torch import nn

from tinygptv.train.batches import Batch


class TrainForward(nn.Module):
    """With several processes every one of them runs the same modules in every micro-batch: where its share of the
    batch has no image it encodes a blank one and adds its output to the loss with weight 0. FSDP needs that (a
    sharded module's gather is a collective that every process must join) and DDP then sees every trainable weight
    used, so it needs no search for unused ones.

    Sharded, the LLM's input embeddings always ask for a gradient: FSDP reduces a layer's gradients as soon as the
    gradient of its input is computed, or, when its input needs none, only at the end of the backward pass; the
    first layer's reduction would come at different places on a process with images (embeddings that need a
    gradient) and on a text-only one, and the processes' collectives would no longer pair up."""

    def __init__(self, model: nn.Module, *, cache_vision: bool = False, same_modules_everywhere: bool = False,
                 sharded: bool = False):
        super().__init__()
        self.model = model
        self.cache: dict[str, torch.Tensor] | None = {} if cache_vision else None
        self.same_modules_everywhere = same_modules_everywhere
        self.sharded = sharded
        if sharded:
            model.llm.model.register_forward_pre_hook(_input_needs_grad, with_kwargs=True)

    def forward(self, batch: Batch) -> torch.Tensor:
        device = self.model.device
        embeds, unused = None, None
        # The image path runs before the LLM on every process, so the sharded modules' gathers (forward) and
        # reductions (backward, in reverse) come in the same order everywhere.
        if batch.pixel_values is not None:
            encoded = iter(self.model.embed_vision_tokens(self._vision_tokens(batch.pixel_values.to(device),
                                                                              batch.image_keys)))
            embeds = [next(encoded) if has else None for has in batch.has_image]
        elif self.same_modules_everywhere:
            size = self.model.config.vision.image_size
            blank = torch.zeros(1, 3, size, size, device=device)
            unused = 0.0 * self.model.embed_vision_tokens(self._vision_tokens(blank, [None])).sum()
        loss = self.model(None, batch.prompts, batch.answers, image_embeds=embeds).loss
        return loss if unused is None else loss + unused

    def _vision_tokens(self, pixels: torch.Tensor, keys: list[str | None]) -> torch.Tensor:
        """The frozen tower's output for these images ([n, 3, S, S] -> [n, N, Dv]), from the cache where it has them.
        A sharded tower runs once per micro-batch even when every image is cached (on the first one again, output
        unused), so that its gathers line up with the other processes'."""
        if self.cache is None:
            return self.model.visual_encoder(pixels)
        todo = [i for i, key in enumerate(keys) if key is None or key not in self.cache]
        fresh: dict[int, torch.Tensor] = {}
        if todo or self.sharded:
            with torch.no_grad():
                out = self.model.visual_encoder(pixels[todo] if todo else pixels[:1])
            # rounded to bf16 whether or not it was cached, so a resumed run (empty cache) sees the same values
            fresh = dict(zip(todo, out.to(torch.bfloat16)))
            for i in todo:
                if keys[i] is not None:
                    self.cache[keys[i]] = fresh[i]
        rows = [fresh[i] if i in fresh else self.cache[key] for i, key in enumerate(keys)]
        return torch.stack(rows).float()


def _input_needs_grad(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of the LLM's decoder stack: text-only input embeddings become a leaf that needs a gradient
    (same values; the gradient is computed and dropped)."""
    embeds = kwargs.get("inputs_embeds")
    if embeds is not None and torch.is_grad_enabled() and not embeds.requires_grad:
        kwargs["inputs_embeds"] = embeds.detach().requires_grad_()
    return args, kwargs
