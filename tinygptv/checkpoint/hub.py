# Where a model name points to: a local folder, or a Hugging Face Hub id resolved through huggingface_hub (its cache,
# HF_HUB_OFFLINE and HF_HUB_CACHE apply). Sits before loading: name -> local folder -> checkpoint reader.
from __future__ import annotations

import os
from pathlib import Path

# Only what our format needs, so a Hub repo that also carries other files does not pull them.
CHECKPOINT_FILES = ["config.json", "model.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "README.md"]


class ModelNotFoundError(FileNotFoundError):
    pass


def resolve_model_dir(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A folder is used as it is; anything else is taken as a Hub id. Offline (HF_HUB_OFFLINE=1) only the local
    cache is read; online a failed download becomes one error that says what to do instead."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists():
        raise ModelNotFoundError(f"{name}: is a file, expected a model folder (config.json + model.safetensors)")
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFoundError(f"{name}: no such model folder (and it is not a Hub id of the form 'owner/name')")
    # Imported here, not at the top: huggingface_hub's download API costs ~0.25 s of every `ask`'s start-up, and only
    # Hub ids need it.
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(
            snapshot_download(
                repo_id=name,
                revision=revision,
                allow_patterns=CHECKPOINT_FILES,
                local_files_only=constants.HF_HUB_OFFLINE,
            )
        )
    except HFValidationError as e:
        raise ModelNotFoundError(f"{name}: not a folder and not a valid Hub id ({e})") from None
    except Exception as e:  # connection errors, missing cache entries, gated repos: all end the same way for a user
        where = "the local Hugging Face cache" if constants.HF_HUB_OFFLINE else "the Hugging Face Hub"
        raise ModelNotFoundError(
            f"{name}: not a local folder, and {where} could not provide it ({type(e).__name__}: {e}). "
            "Download the model on a machine with access and pass its folder, or point HF_HUB_CACHE at a cache "
            "that holds it."
        ) from None
