"""What every run needs around Lightning: loggers that never prompt, DDP under Hydra multirun,
jobs that leave the process clean, a writable output folder, and one-line user errors."""

from __future__ import annotations

import errno
import functools
import logging
import netrc
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning import Callback, Trainer
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import MissingMandatoryValue

from anomaly.errors import AnomalyError, RunFolderError
from anomaly.run_folder import check_writable

log = logging.getLogger(__name__)

# Errors of the file system the user can fix (space, quota, permissions), not of the program.
FILE_SYSTEM_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def instantiate_group(config: DictConfig | None) -> list:
    """Instantiate every entry of a config group that holds a `_target_` (callbacks, loggers)."""
    if not config:
        return []
    return [instantiate(entry) for entry in config.values() if "_target_" in entry]


def wandb_has_credentials() -> bool:
    """True when wandb could log in without asking: an API key in the environment or netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def prepare_wandb(cfg: DictConfig) -> None:
    """Make wandb run offline (never prompt) when it is configured but not logged in."""
    uses_wandb = any(
        "Wandb" in str(entry.get("_target_", "")) for entry in (cfg.get("logger") or {}).values()
    )
    if uses_wandb and not os.environ.get("WANDB_MODE") and not wandb_has_credentials():
        os.environ["WANDB_MODE"] = "offline"


def prepare_ddp_launch(cfg: DictConfig) -> None:
    """Let Lightning's DDP launcher start the other ranks of a Hydra multirun job correctly.

    The launcher re-runs this script with the original command line, which under `-m` would start
    the whole sweep again in every rank, each in a new folder. Instead each rank must re-run this
    job alone, in this job's folder.
    """
    if not HydraConfig.initialized() or not str(cfg.trainer.get("strategy")).startswith("ddp"):
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


def build_trainer(cfg: DictConfig, extra_callbacks: list[Callback] = ()) -> Trainer:
    prepare_wandb(cfg)
    prepare_ddp_launch(cfg)
    callbacks: list[Callback] = instantiate_group(cfg.get("callbacks")) + list(extra_callbacks)
    loggers: list[Logger] = instantiate_group(cfg.get("logger"))
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)


def isolated_job(task: Callable) -> Callable:
    """Run a task so that the next Hydra multirun job in this process starts clean.

    Lightning's DDP launcher leaves MASTER_PORT, LOCAL_RANK, WORLD_SIZE... in the environment of
    the process that launched the ranks; a second job would take them for an external launcher's
    and wait for ranks that never come. Variables set before the job (SLURM, torchrun) are kept.
    """

    @functools.wraps(task)
    def run(*args, **kwargs):
        saved = dict(os.environ)
        try:
            return task(*args, **kwargs)
        finally:
            os.environ.clear()
            os.environ.update(saved)

    return run


def close_job(trainer: Trainer | None) -> None:
    """Finish wandb runs so each multirun job logs to its own run, even when a job fails, and
    end the job's process group, so the next multirun job in this process starts its own."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if trainer is None:
        return
    for logger in trainer.loggers:
        experiment = getattr(logger, "_experiment", None)
        if experiment is not None and hasattr(experiment, "finish"):
            experiment.finish()


def user_error_message(error: BaseException) -> str | None:
    """The one-line message of an error the user can fix, also when Hydra wrapped it; None for
    anything else (a bug, which keeps its traceback)."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    if isinstance(error, (AnomalyError, MissingMandatoryValue)):
        return " ".join(str(error).split())
    if isinstance(error, torch.OutOfMemoryError):
        return (
            "out of memory; lower data.batch_size, data.eval_batch_size or data.image_size, or "
            "set model.pixel_thresholds (binned pixel metrics)"
        )
    if isinstance(error, OSError) and error.errno in FILE_SYSTEM_ERRORS and error.filename:
        # A full disk, a quota, a read-only or forbidden folder: the file and the reason.
        return f"{error.filename}: {error.strerror}"
    return None


class OutputFolderCheck(HydraCallback):
    """Hydra callback: stop with one line when the run (or sweep) folder cannot be written,
    before Hydra itself tries to (with a traceback)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, "run")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, "sweep")

    @staticmethod
    def _check(config: DictConfig, kind: str) -> None:
        # The default folders read `hydra:runtime.cwd`, which resolves only once Hydra's own
        # config is set; Hydra sets it after this callback, so set it here first.
        HydraConfig.instance().set_config(config)
        try:
            check_writable(Path(config.hydra[kind].dir))
        except RunFolderError as error:
            sys.exit(f"error: {error}")


@contextmanager
def exit_on_user_error():
    """Turn the user's errors into `error: <one line>` and exit status 1; re-raise the rest."""
    try:
        yield
    except Exception as error:
        message = user_error_message(error)
        if message is None:
            raise
        sys.exit(f"error: {message}")
