"""Reading the project's checkpoints safely, with one-line errors for files that are not usable.

Every checkpoint is loaded with `torch.load(weights_only=True)`: tensors and plain containers
only, so a file handed over by someone else can never run code while it loads. The project's
checkpoints hold nothing else (the run's config is stored as a plain dict).
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import torch

from anomaly.errors import CheckpointError

log = logging.getLogger(__name__)


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by train.py (on the CPU, weights only).

    Returns:
        The checkpoint dict; its "config" holds the run's resolved config.

    Raises:
        CheckpointError: the file is missing or unreadable, needs code to load, or holds no
            config.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        forbidden = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if forbidden:
            raise CheckpointError(
                f"{path}: refused: loading it would run code ({forbidden.group(1)}); a checkpoint "
                "of this project holds only tensors and plain containers"
            ) from None
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
        detail = reason.group(1).strip() if reason else " ".join(str(err).split())
        raise CheckpointError(f"{path}: not a readable checkpoint ({detail})") from None
    except Exception as err:  # truncated, not a zip or pickle: the same thing to the user
        raise CheckpointError(f"{path}: not a readable checkpoint ({err})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("config"), dict):
        raise CheckpointError(f"{path}: checkpoint holds no config (not written by train.py)")
    return checkpoint


def resume_path(ckpt_path: str | None, output_dir: str, model_name: str) -> str | None:
    """The checkpoint a training run continues from: `ckpt_path` when given, else this run
    folder's `last.ckpt` when it exists (a requeued, preempted job), else None.

    The checkpoint is read first, so a file that is unreadable, unsafe or of another model is
    refused with one line before training starts.
    """
    if ckpt_path in ("last", "hpc"):  # Lightning's own names
        return ckpt_path
    from_folder = not ckpt_path
    if from_folder:
        last = Path(output_dir) / "checkpoints" / "last.ckpt"
        if not last.is_file():
            return None
        ckpt_path = str(last)
        log.info("resuming from %s", last)
    try:
        saved = read_checkpoint(ckpt_path)["config"].get("model", {}).get("name")
    except CheckpointError as error:
        if not from_folder:
            raise
        raise CheckpointError(
            f"{error}; this run folder cannot be resumed: delete the file to start it over, or "
            "choose another folder (hydra.run.dir=...)"
        ) from None
    if saved != model_name:
        raise CheckpointError(
            f"{ckpt_path}: checkpoint of model {saved!r}, cannot resume it as {model_name!r}"
        )
    return ckpt_path
