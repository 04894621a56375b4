# The learning-rate schedule of every official stage (LAVIS linear_warmup_cosine_lr), by global step, so a resumed
# run continues on the same curve. Sits in the loop: step -> lr for every parameter group.
from __future__ import annotations

import math

from tinygptv.train.recipe import Schedule


def learning_rate(s: Schedule, step: int) -> float:
    total = s.max_epoch * s.iters_per_epoch
    if step < s.warmup_steps:
        # The official warm-up uses the step within the epoch; by global step it is the same for warm-ups shorter
        # than an epoch (every official stage) and continuous otherwise.
        return s.warmup_lr + (s.init_lr - s.warmup_lr) * step / max(1, s.warmup_steps)
    # Cosine from step 0 (not from the end of warm-up), as the official scheduler computes it. With min_lr > init_lr
    # (stage 4 as released) this curve rises; that is the recipe's explicit choice, not an accident here.
    return s.min_lr + (s.init_lr - s.min_lr) * 0.5 * (1.0 + math.cos(math.pi * step / max(1, total)))
