# What a training run's output_dir may hold, and the check `tinygptv train` makes before any work: a folder that holds
# other files (a photo, notes, a model folder) is refused unless --overwrite, so training never writes into, or later
# prunes checkpoints beside, what it did not create. Data path: recipe.output_dir -> [this check] -> the training loop.
from __future__ import annotations

import re
from pathlib import Path

from tinygptv.atomic import OLD_MARKER, STAGING_SUFFIX, check_output_dir
from tinygptv.train.checkpointing import PREFIX

# Entries the training loop writes into output_dir: checkpoints, the base model a random preset is saved as, the final
# model, the recipe it ran with, TensorBoard logs.
RUN_ENTRIES = ("base", "final", "recipe.json", "tensorboard")
_CHECKPOINT = re.compile(rf"{re.escape(PREFIX)}\d+")


def is_run_entry(name: str) -> bool:
    """An entry of a run folder of ours, or what an interrupted write of one leaves (staging, a version moved aside)."""
    if name.startswith(".") and (name.endswith(STAGING_SUFFIX) or OLD_MARKER in name):
        return True
    return name in RUN_ENTRIES or _CHECKPOINT.fullmatch(name) is not None


def check_run_dir(output_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse an output_dir that holds anything a run does not write, naming those entries and --overwrite (which
    trains into it and leaves them alone). A run folder of ours passes: training resumes from its last checkpoint."""
    check_output_dir(output_dir, is_run_entry, overwrite=overwrite, what="training run folder")
