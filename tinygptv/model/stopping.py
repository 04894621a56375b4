# When to stop decoding early, besides the stop strings and the token budget: an answer caught in a loop ("a cat, a
# cat, a cat, ...") ends once the loop is plain, instead of spending the rest of max_new_tokens on it.
# Data path: generate() -> [these criteria, checked after every new token] -> the answer.
from __future__ import annotations

import torch
from transformers import StoppingCriteria

LONGEST_PHRASE = 32  # tokens: a repeated unit longer than this is not what a loop looks like
SHORTEST_LOOP = 8  # tokens: "!!!!" or "0000" is text, not a loop worth cutting


class RepeatGuard(StoppingCriteria):
    """Stops a row once its newest tokens are the same phrase (1 to LONGEST_PHRASE tokens) `repeats` times in a row,
    covering at least SHORTEST_LOOP tokens. Reads only the tokens generated so far (with inputs_embeds, generate()
    passes exactly those)."""

    def __init__(self, repeats: int):
        if repeats < 2:
            raise ValueError(f"a loop needs at least 2 repeats, got {repeats}")
        self.repeats = repeats

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        tail = input_ids[:, -self.repeats * LONGEST_PHRASE:].tolist()  # [B, <= repeats * LONGEST_PHRASE]
        return torch.tensor([self.looping(row) for row in tail], dtype=torch.bool, device=input_ids.device)

    def looping(self, ids: list[int]) -> bool:
        for period in range(1, LONGEST_PHRASE + 1):
            span = period * self.repeats
            if span > len(ids):
                break
            if span < SHORTEST_LOOP:
                continue
            recent = ids[-span:]
            if all(recent[i] == recent[i % period] for i in range(period, span)):
                return True
        return False
