"""Reading the project's checkpoints, with one-line errors for files that are not usable."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from anomaly.errors import CheckpointError

log = logging.getLogger(__name__)


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by train.py (on the CPU).

    Returns:
        The checkpoint dict; its "config" holds the run's resolved config.

    Raises:
        CheckpointError: the file is missing, unreadable, or holds no config.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # any unpickling failure means the same thing to the user
        raise CheckpointError(f"{path}: not a readable checkpoint ({err})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("config") is None:
        raise CheckpointError(f"{path}: checkpoint holds no config (not written by train.py)")
    return checkpoint


def resume_path(ckpt_path: str | None, output_dir: str) -> str | None:
    """The checkpoint a training run continues from: `ckpt_path` when given, else this run
    folder's `last.ckpt` when it exists (a requeued, preempted job), else None."""
    if ckpt_path in ("last", "hpc"):  # Lightning's own names
        return ckpt_path
    if ckpt_path:
        if not Path(ckpt_path).is_file():
            raise CheckpointError(f"{ckpt_path}: checkpoint to resume from does not exist")
        return ckpt_path
    last = Path(output_dir) / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.info("resuming from %s", last)
        return str(last)
    return None
