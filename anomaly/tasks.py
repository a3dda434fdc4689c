"""The train and eval tasks behind `train.py` and `eval.py`: instantiate, fit, test, report."""

from __future__ import annotations

import functools
import logging
import netrc
import os
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning import Callback, Trainer
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import MissingMandatoryValue

from anomaly.callbacks import ConfigInCheckpoint
from anomaly.data.mvtec import DatasetError

log = logging.getLogger(__name__)

# Errors that mean "the user's input is wrong": reported as one line, without a stack trace.
USER_ERRORS = (ValueError, MissingMandatoryValue, InstantiationException, FileNotFoundError)

METRIC_KEYS = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max", "pixel_f1_max")


def one_line(error: BaseException) -> str:
    """The message of an error on one line (Hydra wraps constructor errors in several lines)."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return " ".join(str(error).split())


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


def format_metrics(metrics: dict) -> str:
    """A readable table of the test metrics, per-defect image AUROC below."""
    lines = [f"{'metric':<22}{'value':>8}", "-" * 30]
    lines += [f"{key:<22}{metrics[key]:>8.4f}" for key in METRIC_KEYS if key in metrics]
    per_defect = metrics.get("per_defect") or {}
    if per_defect:
        lines += ["", f"{'image AUROC per defect':<22}", "-" * 30]
        lines += [f"{name:<22}{value:>8.4f}" for name, value in per_defect.items()]
    return "\n".join(lines)


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


def _close_loggers(trainer: Trainer | None) -> None:
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


@rank_zero_only
def save_resolved_config(cfg: DictConfig) -> None:
    """Write the fully resolved config next to Hydra's (which keeps interpolations)."""
    folder = Path(cfg.paths.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / "config_resolved.yaml", resolve=True)


def resumable_checkpoint(output_dir: str) -> str | None:
    """`last.ckpt` of this run directory when it exists: a requeued (preempted) job continues."""
    last = Path(output_dir) / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.info("resuming from %s", last)
        return str(last)
    return None


@isolated_job
def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Fit a model, then test its best checkpoint.

    Returns:
        (test metrics as written to metrics.json, validation metrics of the best checkpoint).
    """
    L.seed_everything(cfg.seed, workers=True)
    save_resolved_config(cfg)
    ckpt_path = cfg.get("ckpt_path") or resumable_checkpoint(cfg.paths.output_dir)
    if ckpt_path not in (None, "last", "hpc") and not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"{ckpt_path}: checkpoint to resume from does not exist")
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    trainer = None
    try:
        trainer = build_trainer(cfg, [ConfigInCheckpoint(cfg)])
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
        val_metrics = {
            key: float(value)
            for key, value in trainer.callback_metrics.items()
            if key.startswith("val/")
        }
        # The checkpoint callback that selects on a validation metric (the other keeps last.ckpt).
        checkpoint = next((c for c in trainer.checkpoint_callbacks if c.monitor), None)
        if checkpoint is not None and checkpoint.best_model_score is not None:
            val_metrics[checkpoint.monitor] = float(checkpoint.best_model_score)
        best = checkpoint.best_model_path if checkpoint is not None else ""
        for logger in trainer.loggers:
            logger.log_hyperparams({"best_checkpoint": best})
        test_metrics = {}
        if cfg.get("test", True):
            trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=False)
            test_metrics = model.test_results
    finally:
        _close_loggers(trainer)
    return test_metrics, val_metrics


def _overridden_data(cfg: DictConfig, saved: dict) -> DictConfig:
    """The checkpoint's data config, unless the command line chose another (`data=...`), with
    any `data.key=value` overrides applied on top."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    if any(o.split("=", 1)[0].lstrip("+~") == "data" for o in overrides):
        return cfg.data
    data = OmegaConf.create(saved["data"])
    dotlist = [o.lstrip("+") for o in overrides if o.lstrip("+").startswith("data.")]
    return OmegaConf.merge(data, OmegaConf.from_dotlist([o[len("data.") :] for o in dotlist]))


def read_checkpoint(path: Path) -> dict:
    """Load a checkpoint written by train.py (on the CPU), with one-line errors for bad files.

    Returns:
        The checkpoint dict; its "config" holds the run's resolved config.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # any unpickling failure means the same thing to the user
        raise DatasetError(f"{path}: not a readable checkpoint ({err})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("config") is None:
        raise DatasetError(f"{path}: checkpoint holds no config (not written by train.py)")
    return checkpoint


@isolated_job
def evaluate(cfg: DictConfig) -> dict:
    """Re-test a checkpoint and write the same outputs as a training run.

    The model config always comes from the checkpoint (it must match the weights); the data config
    too, unless overridden on the command line.
    """
    path = Path(cfg.ckpt_path)
    saved = read_checkpoint(path)["config"]
    with open_dict(cfg):
        cfg.model = OmegaConf.create(saved["model"])
        cfg.data = _overridden_data(cfg, saved)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    trainer = None
    try:
        trainer = build_trainer(cfg)
        trainer.test(model, datamodule=datamodule, ckpt_path=str(path), weights_only=False)
    finally:
        _close_loggers(trainer)
    return model.test_results
