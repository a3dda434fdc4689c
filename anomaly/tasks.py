"""The train and eval tasks behind `train.py` and `eval.py`: build, fit, test, report."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from anomaly.anomaly_map import FORMER_SIDE_PER_SIGMA, AnomalyMap
from anomaly.callbacks import ConfigInCheckpoint
from anomaly.checkpoints import read_checkpoint, resume_path
from anomaly.config_checks import check_threshold_config, check_training_config
from anomaly.detector import AnomalyDetector, check_score_settings
from anomaly.errors import ConfigError
from anomaly.metrics import METRIC_KEYS
from anomaly.module import AnomalyModule
from anomaly.objective import ReconstructionLoss
from anomaly.run_folder import claim_for_evaluation, claim_for_training, save_run_settings
from anomaly.runtime import build_trainer, close_job, isolated_job


def build_detector(model: DictConfig) -> AnomalyDetector:
    """The pure torch detector of a model config (`conf/model/*.yaml`), untrained."""
    # Checkpoints of runs before the setting existed smoothed over 1/64 of the shorter side.
    anomaly_map = {"side_per_sigma": FORMER_SIDE_PER_SIGMA, **model.anomaly_map}
    return AnomalyDetector(
        instantiate(model.net),
        AnomalyMap(**anomaly_map),
        top_k=model.score.top_k,
        # Checkpoints of runs before the setting existed scored the maximum (or top_k).
        top_share=model.score.get("top_share"),
        standardize=model.score.standardize,
        # Checkpoints of runs before the setting existed trained without it.
        normalize_levels=model.get("normalize_levels", False),
    )


def load_detector(path: str | Path) -> tuple[AnomalyDetector, dict]:
    """The trained detector of a checkpoint written by train.py (eval mode, on the CPU) and the
    run's resolved config."""
    checkpoint = read_checkpoint(path)
    config = checkpoint["config"]
    detector = build_detector(OmegaConf.create(config["model"]))
    prefix = "detector."
    weights = {
        k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
    }
    detector.load_state_dict(weights)
    return detector.eval(), config


def build_module(model: DictConfig, threshold: DictConfig | None = None) -> AnomalyModule:
    """The Lightning module of a model config: its detector, objective loss and optimizer."""
    return AnomalyModule(
        build_detector(model),
        ReconstructionLoss(**model.objective.loss),
        optimizer=instantiate(model.optimizer),
        name=model.name,
        pixel_thresholds=model.pixel_thresholds,
        # Checkpoints of runs before the setting existed trained without it.
        channels_last=model.get("channels_last", False),
        threshold=OmegaConf.to_container(threshold) if threshold is not None else None,
    )


def format_metrics(metrics: dict) -> str:
    """A readable table of the test metrics, per-defect image AUROC below."""
    lines = [f"{'metric':<22}{'value':>8}", "-" * 30]
    lines += [f"{key:<22}{metrics[key]:>8.4f}" for key in METRIC_KEYS if key in metrics]
    per_defect = metrics.get("per_defect") or {}
    if per_defect:
        lines += ["", f"{'image AUROC per defect':<22}", "-" * 30]
        lines += [f"{name:<22}{value:>8.4f}" for name, value in per_defect.items()]
    return "\n".join(lines)


@isolated_job
def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Fit a model, then test its best checkpoint.

    Returns:
        (test metrics as written to metrics.json, validation metrics of the best checkpoint).
    """
    L.seed_everything(cfg.seed, workers=True)
    # Checked before this task writes anything (config_resolved.yaml, checkpoints, logs).
    model = build_module(cfg.model, cfg.get("threshold"))
    check_training_config(cfg, model.detector.net.stride)
    claim_for_training(cfg)
    ckpt_path = resume_path(cfg.get("ckpt_path"), cfg.paths.output_dir, cfg.model.name)
    save_run_settings(cfg)
    datamodule = instantiate(cfg.data)
    trainer = None
    try:
        trainer = build_trainer(cfg, [ConfigInCheckpoint(cfg)])
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
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
            trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
            test_metrics = model.test_results
    finally:
        close_job(trainer)
    return test_metrics, val_metrics


def data_for_eval(saved: dict, changes: DictConfig) -> DictConfig:
    """The checkpoint's data config with the keys `changes` sets (not null) replaced.

    A new `root` is read as a real MVTec-layout folder: the built-in set is not generated there.
    """
    data = OmegaConf.create(saved)
    for key, value in changes.items():
        if value is not None:
            data[key] = value
    if changes.get("root") is not None:
        data.synthetic = None
    return data


def recalibration_changes(cfg: DictConfig, group: str) -> dict:
    """The keys of `cfg[group]` set (not null) on an eval config; they need `recalibrate`."""
    changes = {k: v for k, v in (cfg.get(group) or {}).items() if v is not None}
    if changes and not cfg.get("recalibrate", False):
        keys = ", ".join(f"{group}.{key}" for key in changes)
        raise ConfigError(f"{keys} takes effect only with recalibrate=true")
    return changes


def threshold_for_eval(saved: dict | None, cfg: DictConfig) -> dict | None:
    """The checkpoint's threshold setting with the keys `cfg.threshold` sets (not null)
    replaced; they need `recalibrate`, since only a validation calibrates the threshold."""
    changes = recalibration_changes(cfg, "threshold")
    if not changes:
        return saved
    merged = {**(saved or {}), **changes}
    check_threshold_config(merged)
    return merged


def map_for_eval(saved: dict, cfg: DictConfig) -> dict:
    """The checkpoint's anomaly-map setting with the keys `cfg.anomaly_map` sets (not null:
    the smoothing, the error terms' weights) replaced; they need `recalibrate`, since the normal
    statistics, the standardization choice and the threshold were fitted to the checkpoint's own
    maps. For example `anomaly_map.side_per_sigma=128` gives a checkpoint from before that setting
    today's smoothing, `anomaly_map.ssim=0` drops the SSIM term.
    """
    changes = recalibration_changes(cfg, "anomaly_map")
    if not changes:
        return saved
    merged = {"side_per_sigma": FORMER_SIDE_PER_SIGMA, **saved, **changes}
    # Refused before the eval folder is claimed: nothing is written for a bad setting.
    AnomalyMap(**merged)
    return merged


def score_for_eval(saved: dict, cfg: DictConfig) -> dict:
    """The checkpoint's image-score setting with the keys `cfg.score` sets (not null) replaced.

    `top_k` and `top_share` replace the checkpoint's choice of pixels together (`top_k=1`
    scores the maximum). They need `recalibrate`: the standardization choice and the threshold
    were fitted to the checkpoint's own score.
    """
    changes = recalibration_changes(cfg, "score")
    if not changes:
        return saved
    merged = dict(saved)
    if "top_k" in changes or "top_share" in changes:
        merged["top_k"], merged["top_share"] = None, None
    merged.update(changes)
    # Refused before the eval folder is claimed: nothing is written for a bad setting.
    check_score_settings(merged.get("top_k"), merged.get("top_share"), merged.get("standardize"))
    return merged


@isolated_job
def evaluate(cfg: DictConfig) -> dict:
    """Re-test a checkpoint and write the same outputs as a training run.

    The model and data configs come from the checkpoint (they must match the weights); the data,
    image-score and map-smoothing keys set in `eval.yaml` or on the command line replace the
    checkpoint's. With `recalibrate`, the checkpoint is validated first, on the run's held-out
    normals and today's synthetic anomalies, which fits what validation decides (normal
    statistics, standardization, threshold) again for the test.
    """
    path = Path(cfg.ckpt_path)
    saved = read_checkpoint(path)["config"]
    threshold = threshold_for_eval(saved.get("threshold"), cfg)
    score = score_for_eval(saved["model"]["score"], cfg)
    anomaly_map = map_for_eval(saved["model"]["anomaly_map"], cfg)
    with open_dict(cfg):
        cfg.model = OmegaConf.create({**saved["model"], "score": score, "anomaly_map": anomaly_map})
        cfg.data = data_for_eval(saved["data"], cfg.data)
    claim_for_evaluation(cfg.paths.output_dir)
    save_run_settings(cfg)
    L.seed_everything(saved["seed"], workers=True)
    datamodule = instantiate(cfg.data)
    model = build_module(cfg.model, OmegaConf.create(threshold) if threshold else None)
    trainer = None
    try:
        trainer = build_trainer(cfg)
        if cfg.get("recalibrate", False):
            # Today's validation set: normal statistics, standardization and threshold anew.
            trainer.validate(model, datamodule=datamodule, ckpt_path=str(path), weights_only=True)
            trainer.test(model, datamodule=datamodule)
        else:
            trainer.test(model, datamodule=datamodule, ckpt_path=str(path), weights_only=True)
    finally:
        close_job(trainer)
    return model.test_results
