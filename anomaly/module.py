"""The Lightning module of every model: data -> detector -> loss, metrics and logs.

The detector (network, anomaly map, score), the loss and the optimizer arrive built; this class
only wires them into Lightning's loops. Both models use it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from lightning import LightningModule
from torch import Tensor, nn

from anomaly.detector import (
    AnomalyDetector,
    NormalMapStatistics,
    ValidationMaps,
    calibrate_threshold,
)
from anomaly.errors import ConfigError, NonFiniteError
from anomaly.metrics import AUROC, METRIC_KEYS, F1Max, PerGroupAUROC, PixelMetrics
from anomaly.objective import ReconstructionLoss


def stage_metrics(pixel_thresholds: int | None, max_score: float, test: bool) -> nn.ModuleDict:
    """The metric objects of one stage (each stage owns its own, so states never mix)."""
    metrics = {
        "image_auroc": AUROC(),
        "pixel": PixelMetrics(thresholds=pixel_thresholds, score_range=(0.0, max_score)),
    }
    if test:
        metrics["image_f1_max"] = F1Max()
    return nn.ModuleDict(metrics)


def update_stage_metrics(
    metrics: nn.ModuleDict, maps: Tensor, masks: Tensor, scores: Tensor, labels: Tensor
) -> None:
    """Feeds a batch: maps (B, H, W), masks (B, H, W) or (B, 1, H, W), scores and labels (B,)."""
    metrics["image_auroc"].update(scores, labels)
    if "image_f1_max" in metrics:
        metrics["image_f1_max"].update(scores, labels)
    metrics["pixel"].update(maps, masks)


def compute_stage_metrics(metrics: nn.ModuleDict) -> dict[str, Tensor]:
    """Every metric of a stage by its key (`image_auroc`, `pixel_aupro`, ...), then resets them."""
    results = {}
    for key, metric in metrics.items():
        value = metric.compute()
        results.update(value if isinstance(value, dict) else {key: value})
        metric.reset()
    return results


class AnomalyModule(LightningModule):
    """Trains a detector's network to reconstruct (or restore) normal images.

    A training batch holds `input` (what the network sees: the clean image, or a corrupted copy
    for the restoration objective), `image` (the clean target) and `mask` (corrupted pixels).
    Validation also fits the detector's normal-map statistics on the held-out normal images.

    Args:
        detector: the pure torch detector; its network is what trains.
        loss: (prediction, target, mask) -> (total, terms).
        optimizer: partial optimizer, called with the parameters.
        name: model name written to metrics.json.
        pixel_thresholds: None for exact pixel metrics; an int bins them for fixed memory.
        threshold: how the verdict threshold is calibrated on validation: `method` ("fpr", the
            default, or "f1_max") and `fpr` (see `calibrate_threshold`).
        channels_last: keep the network's weights and the batches' images in the channels-last
            memory format (NHWC), which the CPU and GPU convolution kernels run fastest on; the
            results are the same.
    """

    def __init__(
        self,
        detector: AnomalyDetector,
        loss: ReconstructionLoss,
        optimizer: Callable,
        name: str = "model",
        pixel_thresholds: int | None = None,
        threshold: dict | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.threshold = {"method": "fpr", "fpr": 0.01, **(threshold or {})}
        self.channels_last = channels_last
        if channels_last:
            # Kept through `.to(device)` and checkpoint loading (copies into these tensors).
            detector.net.to(memory_format=torch.channels_last)
        self.detector, self.loss = detector, loss
        self.optimizer, self.name = optimizer, name
        max_score = detector.anomaly_map.max_value
        self.val_metrics = stage_metrics(pixel_thresholds, max_score, test=False)
        self.test_metrics = stage_metrics(pixel_thresholds, max_score, test=True)
        self.normal_statistics = NormalMapStatistics()
        self.validation_maps = ValidationMaps()
        self.test_per_defect: PerGroupAUROC | None = None
        self.defect_types: list[str] = []
        self.test_results: dict = {}

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        # Training corruptions that run on the device (`data.corruption.device=model`).
        datamodule = None if self._trainer is None else self._trainer.datamodule
        corrupt_on_device = getattr(datamodule, "corrupt_on_device", None)
        if corrupt_on_device is not None:
            batch = corrupt_on_device(batch)
        if self.channels_last:
            for key in ("input", "image"):
                if key in batch:
                    batch[key] = batch[key].contiguous(memory_format=torch.channels_last)
        return batch

    def on_fit_start(self) -> None:
        detector = self.detector
        if detector.normalize_levels and not detector.has_reference_levels:
            levels = getattr(self.trainer.datamodule, "training_levels", None)
            if levels is None:
                raise ConfigError(
                    "model.normalize_levels needs the training images' levels: train with "
                    "anomaly.data.datamodule.AnomalyDataModule"
                )
            detector.set_reference_levels(*levels())

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        # The network restores in the input's matched levels, so the target is matched alike.
        matched, gain, offset = self.detector.match_levels(batch["input"])
        prediction = self.detector.net(matched)
        target = (batch["image"] * gain + offset).clamp(0.0, 1.0)
        total, terms = self.loss(prediction, target, batch["mask"])
        self._stop_if_diverged(total, batch_idx)
        batch_size = batch["image"].shape[0]
        for key, value in {"loss": total, **terms}.items():
            self.log(
                f"train/{key}",
                value,
                prog_bar=key == "loss",
                on_step=False,
                on_epoch=True,
                batch_size=batch_size,
                sync_dist=True,
            )
        return total

    def _all_ranks_agree(self, decision: bool) -> bool:
        trainer = self._trainer
        return trainer.strategy.reduce_boolean_decision(decision) if trainer else decision

    def _stop_if_diverged(self, loss: Tensor, batch_idx: int) -> None:
        """Stop at the first non-finite loss, before it reaches the weights (on every rank)."""
        if self._all_ranks_agree(bool(torch.isfinite(loss))):
            return
        raise NonFiniteError(
            f"training diverged: the loss is {loss.item()} at epoch {self.current_epoch}, batch "
            f"{batch_idx} (optimizer step {self.global_step}); the checkpoints written so far are "
            f"kept; lower model.optimizer.lr (now {self._learning_rate()})"
        )

    def _learning_rate(self) -> str:
        trainer = self._trainer
        if trainer is None or not trainer.optimizers:
            return "unknown"
        group = trainer.optimizers[0].param_groups[0]
        # The configured rate (model.optimizer.lr), not where the schedule has taken it.
        return f"{group.get('initial_lr', group['lr']):g}"

    def _check_scores(self, maps: Tensor, scores: Tensor, batch: dict) -> None:
        """Refuse NaN or infinite maps and scores: they would make every metric meaningless."""
        finite = bool(torch.isfinite(maps).all() and torch.isfinite(scores).all())
        if self._all_ranks_agree(finite):
            return
        bad = (~torch.isfinite(maps).flatten(1).all(1)) | ~torch.isfinite(scores)
        path = batch["path"][int(bad.nonzero()[0])] if bad.any() else "another rank's image"
        raise NonFiniteError(
            f"{path}: the anomaly map or score is not finite (epoch {self.current_epoch}); the "
            "weights or the normal-map statistics hold NaN or inf"
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Never write non-finite weights: the checkpoints on disk stay the last good ones."""
        bad = [k for k, v in checkpoint["state_dict"].items() if not torch.isfinite(v).all()]
        if bad:
            more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
            raise NonFiniteError(
                f"training diverged: {bad[0]}{more} holds NaN or inf at epoch "
                f"{self.current_epoch} (optimizer step {self.global_step}), so its checkpoint is "
                "not saved; the checkpoints written so far are kept; lower model.optimizer.lr "
                f"(now {self._learning_rate()})"
            )

    def _update(self, metrics: nn.ModuleDict, batch: dict, maps: Tensor, scores: Tensor) -> None:
        masks = batch["mask"].squeeze(1)
        update_stage_metrics(metrics, maps, masks, scores, batch["label"].long())

    def _detect(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Maps, scores and reconstructions in float32 whatever `trainer.precision` trains in, as
        eval, predict and export compute them, so the statistics and the threshold fitted on
        validation hold for them."""
        with torch.autocast(self.device.type, enabled=False):
            return self.detector(images.float())

    def on_validation_epoch_start(self) -> None:
        self.normal_statistics.reset()
        self.validation_maps.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        maps, scores, reconstruction = self._detect(batch["image"])
        self._check_scores(maps, scores, batch)
        self._update(self.val_metrics, batch, maps, scores)
        self.validation_maps.update(maps, batch["label"])
        normal = batch["label"] == 0
        if normal.any():
            self.normal_statistics.update(maps[normal])
            # Reconstruction loss of the held-out normals: a signal that needs no anomalies.
            loss, _ = self.loss(reconstruction[normal], batch["image"][normal], None)
            self.log("val/loss", loss, on_epoch=True, batch_size=int(normal.sum()), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        for key, value in compute_stage_metrics(self.val_metrics).items():
            self.log(f"val/{key}", value, prog_bar=key == "image_auroc")
        if self.normal_statistics.update_called and not self.trainer.sanity_checking:
            # For the next scores, and saved with this epoch's checkpoint.
            self.detector.set_normal_statistics(*self.normal_statistics.compute())
            self._calibrate_threshold()

    def _calibrate_threshold(self) -> None:
        """Whether scores standardize the maps (logging both scores' image AUROC), then the
        verdict threshold, both on this validation's maps scored with the new statistics."""
        maps, labels = self.validation_maps.compute()
        comparison = self.detector.compare_standardization(maps, labels)
        if comparison is not None:
            self.log("val/image_auroc_raw", comparison[0])
            self.log("val/image_auroc_standardized", comparison[1])
        standardized = self.detector.choose_standardization(maps, labels, comparison)
        self.log("val/standardized", float(standardized))
        scores = self.detector.score(maps)
        threshold = calibrate_threshold(scores, labels, **self.threshold)
        self.detector.set_threshold(threshold, float(scores[labels == 0].median()))
        self.log("val/threshold", threshold)

    def on_test_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        self.defect_types = list(getattr(datamodule, "test_defect_types", []))
        if self.defect_types:
            self.test_per_defect = PerGroupAUROC(len(self.defect_types)).to(self.device)

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        maps, scores, reconstruction = self._detect(batch["image"])
        self._check_scores(maps, scores, batch)
        self._update(self.test_metrics, batch, maps, scores)
        if self.test_per_defect is not None:
            index = {name: i for i, name in enumerate(self.defect_types)}
            groups = torch.tensor([index[d] for d in batch["defect_type"]], device=self.device)
            self.test_per_defect.update(scores, batch["label"].long(), groups)
        # What the TestResultsWriter callback receives as `outputs`.
        return {
            "anomaly_map": maps,
            "pred_score": scores,
            "normalized_score": self.detector.normalized_score(scores),
            "verdict": self.detector.verdict(scores),
            "reconstruction": reconstruction,
        }

    def on_test_epoch_end(self) -> None:
        values = compute_stage_metrics(self.test_metrics)
        results = {}
        for key in METRIC_KEYS:  # in the order metrics.json and the tables show them
            # The float64 tensor: a Python float would be logged as float32.
            self.log(f"test/{key}", values[key])
            results[key] = float(values[key])
        per_defect = {}
        if self.test_per_defect is not None:
            values = self.test_per_defect.compute()
            for name, value in zip(self.defect_types, values.tolist(), strict=True):
                if name != "good":
                    per_defect[name] = value
                    self.log(f"test/image_auroc/{name}", value)
            self.test_per_defect.reset()
        results["per_defect"] = per_defect
        self.test_results = results

    def configure_optimizers(self):
        # The learning rate over the run is `anomaly.callbacks.BudgetSchedule`'s.
        return self.optimizer(params=self.parameters())
