"""Checks of a training config before anything runs: each bad value is a one-line ConfigError
naming the key, the value and the range."""

from __future__ import annotations

from omegaconf import DictConfig

from anomaly.callbacks import LR_SHAPES
from anomaly.data.datamodule import CORRUPTION_DEVICES
from anomaly.detector import THRESHOLD_METHODS
from anomaly.errors import ConfigError


def _fail(key: str, value, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is out of range: {allowed}")


def _check_int(key: str, value, low: int, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(key, value, allowed)


def _check_fraction(key: str, value, low_open: bool = False, high_open: bool = False) -> None:
    bounds = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(key, value, f"a number in {bounds}")
    low_ok = value > 0 if low_open else value >= 0
    high_ok = value < 1 if high_open else value <= 1
    if not (low_ok and high_ok):  # NaN fails both
        _fail(key, value, f"a number in {bounds}")


def check_training_config(cfg: DictConfig, stride: int) -> None:
    """Raise ConfigError for the first setting of `cfg` outside its range.

    Args:
        cfg: the composed training config.
        stride: the network's total downsampling; image sides must be multiples of it.
    """
    data, trainer, model = cfg.data, cfg.trainer, cfg.model
    if data.root is None:
        _fail("data.root", None, "the folder that holds <category>/train, test, ground_truth")
    epochs = trainer.max_epochs
    if trainer.get("max_time") is None or epochs not in (-1, None):
        _check_int("trainer.max_epochs", epochs, 1, "an epoch count >= 1 (or -1 with max_time)")
    _check_int("data.batch_size", data.batch_size, 1, "a batch size >= 1")
    if data.get("eval_batch_size") is not None:
        _check_int("data.eval_batch_size", data.eval_batch_size, 1, "a batch size >= 1 or null")
    _check_int("data.num_workers", data.num_workers, 0, "a worker count >= 0")
    sides = [data.image_size] if isinstance(data.image_size, int) else list(data.image_size)
    allowed = f"a side, or [H, W], >= {stride} and a multiple of {stride} (the network's stride)"
    if len(sides) not in (1, 2):
        _fail("data.image_size", data.image_size, allowed)
    for side in sides:
        if isinstance(side, bool) or not isinstance(side, int) or side < stride or side % stride:
            _fail("data.image_size", data.image_size, allowed)
    _check_fraction("data.val_fraction", data.val_fraction, low_open=True, high_open=True)
    for key, value in model.objective.corruption.items():
        _check_fraction(f"model.objective.corruption.{key}", value)
    device = (data.get("corruption") or {}).get("device", "loader")
    if device not in CORRUPTION_DEVICES:
        _fail("data.corruption.device", device, " or ".join(CORRUPTION_DEVICES))
    for key, value in (data.get("augment") or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            _fail(f"data.augment.{key}", value, "an amount >= 0")
    lr_schedule = model.get("lr_schedule") or {}
    if lr_schedule.get("shape", "constant") not in LR_SHAPES:
        _fail("model.lr_schedule.shape", lr_schedule.get("shape"), " or ".join(LR_SHAPES))
    _check_fraction("model.lr_schedule.final_share", lr_schedule.get("final_share", 0.0))
    decay = (model.get("weight_average") or {}).get("decay")
    if decay is not None:
        _check_fraction("model.weight_average.decay", decay, low_open=True, high_open=True)
    check_threshold_config(cfg.get("threshold") or {})
    schedule = (cfg.get("callbacks") or {}).get("validation_schedule") or {}
    if "max_share" in schedule:
        _check_fraction(
            "callbacks.validation_schedule.max_share", schedule.max_share, low_open=True
        )


def check_threshold_config(threshold) -> None:
    """`threshold.method` one of THRESHOLD_METHODS, `threshold.fpr` in [0, 1)."""
    if threshold.get("method", "fpr") not in THRESHOLD_METHODS:
        _fail("threshold.method", threshold.get("method"), " or ".join(THRESHOLD_METHODS))
    _check_fraction("threshold.fpr", threshold.get("fpr", 0.01), high_open=True)
