"""Callbacks: the learning rate over the run's budget, when to validate, the test outputs written
to the run directory, and the config kept in checkpoints."""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from anomaly.errors import ConfigError
from anomaly.files import atomic_path, write_text
from anomaly.metrics import roc_curve
from anomaly.visualization import colour_scale, heatmap_panel, save_roc_plot

log = logging.getLogger(__name__)


LR_SHAPES = ("cosine", "constant")


def budget_progress(trainer: Trainer, batch_idx: int) -> float:
    """How much of the run's budget is spent, in [0, 1]: the largest of the shares of
    `trainer.max_epochs`, `trainer.max_steps` and `trainer.max_time` (elapsed training time,
    validation included, as the Timer that stops the run counts it) that are set."""
    shares = []
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        batches = max(1, trainer.num_training_batches)
        shares.append((trainer.current_epoch + batch_idx / batches) / trainer.max_epochs)
    if trainer.max_steps is not None and trainer.max_steps > 0:
        shares.append(trainer.global_step / trainer.max_steps)
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    remaining = None if timer is None else timer.time_remaining("train")
    if remaining is not None:
        elapsed = timer.time_elapsed("train")
        shares.append(elapsed / max(elapsed + remaining, 1e-9))
    return min(1.0, max(shares, default=0.0))


class BudgetSchedule(Callback):
    """Sets the learning rate before every training batch from the share of the budget spent.

    Whichever ends the run, the epochs or the clock (`trainer.max_time`), the rate follows it: a
    run stopped by its time budget ends on annealed weights as an epoch-limited one does, and
    resuming goes on from the saved progress. The rates the optimizer was built with are kept in
    its param groups (`initial_lr`, saved in checkpoints) and scaled.

    Args:
        shape: "cosine": from the initial rate down to `final_share` of it, half a cosine over
            the budget; "constant": the initial rate throughout.
        final_share: where the cosine ends, a share of the initial rate in [0, 1].
    """

    def __init__(self, shape: str = "cosine", final_share: float = 0.0) -> None:
        if shape not in LR_SHAPES:
            raise ConfigError(f"model.lr_schedule.shape must be one of {LR_SHAPES}, got {shape!r}")
        if not 0 <= final_share <= 1:
            raise ConfigError(f"model.lr_schedule.final_share must be in [0, 1], got {final_share}")
        self.shape, self.final_share = shape, final_share

    def factor(self, progress: float) -> float:
        """The rate as a share of the initial one after `progress` of the budget."""
        if self.shape == "constant":
            return 1.0
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.final_share + (1.0 - self.final_share) * cosine

    def on_train_batch_start(self, trainer: Trainer, pl_module, batch, batch_idx: int) -> None:
        factor = self.factor(budget_progress(trainer, batch_idx))
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
                group["lr"] = group["initial_lr"] * factor
        # Every rank computes the same rate (the Timer's stop is broadcast, the clocks are close).
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        pl_module.log("train/lr", lr, on_step=False, on_epoch=True, batch_size=1)


class ValidationSchedule(Callback):
    """Validates after an epoch only when it costs at most `max_share` of the time around it.

    Validation (which also fits the normal-map statistics the scores use) runs after an epoch
    when the training time since the last validation is at least its last duration / max_share,
    and always after the first and the last epoch and before a `trainer.max_time` stop, so the
    final weights are validated. A small validation set next to long epochs is validated every
    epoch; a quick epoch next to a costly validation, every few.

    Only takes over from the default `trainer.check_val_every_n_epoch=1` (and
    `val_check_interval` 1.0): any other setting is left to Lightning.

    Args:
        max_share: the largest share of the time validation may take, in (0, 1].
    """

    def __init__(self, max_share: float = 0.1) -> None:
        if not 0 < max_share <= 1:
            raise ConfigError(
                f"callbacks.validation_schedule.max_share must be in (0, 1], got {max_share}"
            )
        self.max_share = max_share
        self.enabled = True
        self._validation_seconds: float | None = None
        self._validation_start = 0.0
        self._last_validation_end = 0.0
        self._last_batch_end = 0.0
        self._batch_seconds = 0.0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.enabled = trainer.check_val_every_n_epoch == 1 and trainer.val_check_interval == 1.0
        if not self.enabled:
            log.info("validation follows trainer.check_val_every_n_epoch / val_check_interval")
        self._validation_seconds = None
        self._last_validation_end = self._last_batch_end = time.monotonic()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._validation_start = time.monotonic()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._last_validation_end = time.monotonic()
        self._validation_seconds = self._last_validation_end - self._validation_start

    def _validate_after_this_epoch(self, trainer: Trainer) -> bool:
        if self._validation_seconds is None or trainer.current_epoch + 1 == trainer.max_epochs:
            return True
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        remaining = timer.time_remaining("train") if timer is not None else None
        if remaining is not None and remaining <= 2 * self._batch_seconds:
            return True  # the time budget stops training within a batch or two
        trained = time.monotonic() - self._last_validation_end
        return self._validation_seconds <= self.max_share * trained

    def on_train_batch_end(self, trainer: Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        self._batch_seconds, self._last_batch_end = now - self._last_batch_end, now
        # Rank 0 decides for all, so every rank enters (or skips) validation together.
        validate = trainer.strategy.broadcast(self._validate_after_this_epoch(trainer), src=0)
        # Lightning validates at an epoch's end (or a stop) when (epoch + 1) % n == 0.
        trainer.check_val_every_n_epoch = 1 if validate else trainer.current_epoch + 2

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_batch_end = time.monotonic()  # batch times leave out validation


def verdict_name(anomalous: bool, normalized_score: float) -> str:
    """`anomalous` or `normal`; `uncalibrated` for a detector without a threshold (nan score)."""
    if not math.isfinite(normalized_score):
        return "uncalibrated"
    return "anomalous" if anomalous else "normal"


def panel_title(path: str, defect_type: str, row: dict) -> str:
    """A heatmap panel's heading: which image, its score and the calibrated verdict."""
    title = f"{defect_type}/{Path(path).name}: score {row['score']:.4g}, {row['verdict']}"
    if math.isfinite(row["normalized_score"]):
        title += f" (normalized {row['normalized_score']:.2f})"
    return title


def _gather(items: list) -> list:
    """All ranks' lists concatenated (the list itself without distributed training)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


class TestResultsWriter(Callback):
    """Writes what a test run produces into `output_dir` (rank 0 only) and shows it to loggers.

    Files: `metrics.json`, `scores.csv` (path, defect_type, label, score, normalized_score,
    verdict: the calibrated threshold's call, `normal` or `anomalous`), `heatmaps/*.png`
    (input, reconstruction, anomaly map, ground truth, overlay; `num_heatmaps` per defect type),
    `roc_image.png` and `roc_pixel.png`.
    """

    def __init__(self, output_dir: str, num_heatmaps: int = 4) -> None:
        self.output_dir = Path(output_dir)
        self.num_heatmaps = num_heatmaps
        self._rows: list[dict] = []
        self._pixels: list[tuple[np.ndarray, np.ndarray]] = []
        self._panels: list[dict] = []

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rows, self._pixels, self._panels = [], [], []

    def on_test_batch_end(
        self, trainer, pl_module, outputs: dict, batch: dict, batch_idx: int, dataloader_idx=0
    ) -> None:
        shown = {}
        for panel in self._panels:
            shown[panel["defect_type"]] = shown.get(panel["defect_type"], 0) + 1
        for i, path in enumerate(batch["path"]):
            defect_type = batch["defect_type"][i]
            self._rows.append(
                {
                    "path": path,
                    "defect_type": defect_type,
                    "label": int(batch["label"][i]),
                    "score": float(outputs["pred_score"][i]),
                    "normalized_score": float(outputs["normalized_score"][i]),
                    "verdict": verdict_name(
                        bool(outputs["verdict"][i]), float(outputs["normalized_score"][i])
                    ),
                }
            )
            self._pixels.append(
                (
                    outputs["anomaly_map"][i].float().cpu().numpy().astype(np.float16),
                    batch["mask"][i, 0].bool().cpu().numpy(),
                )
            )
            if shown.get(defect_type, 0) < self.num_heatmaps:
                shown[defect_type] = shown.get(defect_type, 0) + 1
                self._panels.append(
                    {
                        "path": path,
                        "defect_type": defect_type,
                        "image": batch["image"][i].cpu(),
                        "reconstruction": outputs["reconstruction"][i].float().cpu(),
                        "anomaly_map": outputs["anomaly_map"][i].float().cpu(),
                        "mask": batch["mask"][i, 0].cpu(),
                        "title": panel_title(path, defect_type, self._rows[-1]),
                    }
                )

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rows, pixels, panels = _gather(self._rows), _gather(self._pixels), _gather(self._panels)
        if not trainer.is_global_zero:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        rows.sort(key=lambda row: row["path"])
        metrics = self.metrics_record(trainer, pl_module, len(rows))
        fields = ["path", "defect_type", "label", "score", "normalized_score", "verdict"]
        with (
            atomic_path(self.output_dir / "scores.csv") as temporary,
            open(temporary, "w", newline="") as handle,
        ):
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        self._save_roc_plots(rows, pixels, metrics)
        # One colour scale for every panel of the run, from all test map pixels.
        vmax = colour_scale([anomaly_map for anomaly_map, _ in pixels])
        images = self._save_panels(panels, vmax)
        # Last: a folder with metrics.json holds a finished run (anomaly.run_folder).
        write_text(self.output_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        log_images(trainer, images)

    @staticmethod
    def metrics_record(trainer: Trainer, pl_module: LightningModule, num_images: int) -> dict:
        datamodule = trainer.datamodule
        results = dict(pl_module.test_results)
        # An undefined metric (e.g. a defect type missing from the tested images) is null: JSON
        # has no NaN.
        results["per_defect"] = {
            name: None if math.isnan(value) else value
            for name, value in results.get("per_defect", {}).items()
        }
        for key, value in results.items():
            if isinstance(value, float) and math.isnan(value):
                results[key] = None
        return {
            **results,
            "model": getattr(pl_module, "name", type(pl_module).__name__),
            "category": getattr(datamodule, "category", None),
            "image_size": getattr(datamodule, "image_size", None),
            "num_test_images": num_images,
        }

    def _save_roc_plots(self, rows: list[dict], pixels: list, metrics: dict) -> None:
        scores = torch.tensor([row["score"] for row in rows], dtype=torch.float64)
        labels = torch.tensor([row["label"] for row in rows])
        fpr, tpr = roc_curve(scores, labels)
        save_roc_plot(
            fpr.numpy(),
            tpr.numpy(),
            metrics["image_auroc"],
            "image ROC",
            self.output_dir / "roc_image.png",
        )
        if pixels:
            maps = torch.from_numpy(np.concatenate([m.ravel() for m, _ in pixels]))
            masks = torch.from_numpy(np.concatenate([t.ravel() for _, t in pixels]))
            # Exact points of the curve at up to 4,000 thresholds: a plot, not millions of points.
            fpr, tpr = roc_curve(maps, masks, max_points=4000)
            save_roc_plot(
                fpr.numpy(),
                tpr.numpy(),
                metrics["pixel_auroc"],
                "pixel ROC",
                self.output_dir / "roc_pixel.png",
            )

    def _save_panels(self, panels: list[dict], vmax: float) -> dict[str, np.ndarray]:
        folder = self.output_dir / "heatmaps"
        folder.mkdir(exist_ok=True)
        images = {}
        for panel in sorted(panels, key=lambda p: p["path"]):
            image = heatmap_panel(
                panel["image"],
                panel["reconstruction"],
                panel["anomaly_map"],
                panel["mask"],
                vmax,
                panel["title"],
            )
            name = f"{panel['defect_type']}_{Path(panel['path']).stem}"
            with atomic_path(folder / f"{name}.png") as temporary:
                Image.fromarray(image).save(temporary, format="PNG")
            images[name] = image
        return images


def log_images(trainer: Trainer, images: dict[str, np.ndarray]) -> None:
    """Send heatmap panels to whichever image-capable loggers are configured."""
    if not images:
        return
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(
                key="test/heatmaps", images=list(images.values()), caption=list(images)
            )
        elif isinstance(logger, TensorBoardLogger):
            for name, image in images.items():
                logger.experiment.add_image(f"test/heatmaps/{name}", image, dataformats="HWC")


class ConfigInCheckpoint(Callback):
    """Stores the run's resolved config in every checkpoint (eval.py restores data from it)."""

    def __init__(self, config: DictConfig) -> None:
        self.config = OmegaConf.to_container(config, resolve=True)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["config"] = self.config
