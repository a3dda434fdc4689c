"""The Lightning module shared by every reconstruction model: data -> net -> loss -> logs.

The network, loss, anomaly scorer and optimizer arrive from the Hydra config; this class only wires
them. Both models (the residual autoencoder and the SDC-CCM autoencoder) use it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from lightning import LightningModule
from torch import Tensor, nn

from anomaly.anomaly_map import AnomalyScorer
from anomaly.metrics import AUPRO, AUROC, F1Max, PerGroupAUROC


def stage_metrics(pixel_thresholds: int | None, max_score: float, test: bool) -> nn.ModuleDict:
    """The metric objects of one stage (each stage owns its own, so states never mix)."""
    pixel_range = (0.0, max_score)
    metrics = {
        "image_auroc": AUROC(),
        "pixel_auroc": AUROC(thresholds=pixel_thresholds, score_range=pixel_range),
        "pixel_aupro": AUPRO(),
    }
    if test:
        metrics["image_f1_max"] = F1Max()
        metrics["pixel_f1_max"] = F1Max(thresholds=pixel_thresholds, score_range=pixel_range)
    return nn.ModuleDict(metrics)


class ReconstructionModule(LightningModule):
    """Trains a network to reconstruct (or restore) normal images; scores by reconstruction error.

    Args:
        net: a pure torch network, (B, 3, H, W) in [0, 1] -> (B, 3, H, W).
        loss: `anomaly.models.losses.ReconstructionLoss`-like module, (pred, target, mask) ->
            (total, terms).
        scorer: the anomaly map and score function.
        optimizer: partial optimizer, called with the parameters.
        scheduler: optional partial LR scheduler, called with the optimizer; stepped every epoch.
        name: model name written to metrics.json.
        pixel_thresholds: None for exact pixel AUROC/F1; an int bins them for bounded memory.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        scorer: AnomalyScorer,
        optimizer: Callable,
        scheduler: Callable | None = None,
        name: str = "model",
        pixel_thresholds: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["net", "loss", "scorer"])
        self.net, self.loss, self.scorer = net, loss, scorer
        self.name = name
        self.val_metrics = stage_metrics(pixel_thresholds, scorer.max_value, test=False)
        self.test_metrics = stage_metrics(pixel_thresholds, scorer.max_value, test=True)
        self.test_per_defect: PerGroupAUROC | None = None
        self.defect_types: list[str] = []
        self.test_results: dict = {}
        # Running (count, sum, sum of squares) of held-out normal maps during validation.
        self._normal_sums: list[Tensor] = []

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        """Reconstruct and score a batch: the inference path for test, predict and export.

        Args:
            image: (B, 3, H, W) in [0, 1].

        Returns:
            `reconstruction` (B, 3, H, W), `anomaly_map` (B, H, W), `pred_score` (B,).
        """
        reconstruction = self.net(image)
        anomaly_map, score = self.scorer(image, reconstruction)
        return {"reconstruction": reconstruction, "anomaly_map": anomaly_map, "pred_score": score}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        prediction = self.net(batch["input"])
        total, terms = self.loss(prediction, batch["image"], batch["mask"])
        batch_size = batch["image"].shape[0]
        self.log(
            "train/loss",
            total,
            prog_bar=True,
            on_step=False,
            on_epoch=True,
            batch_size=batch_size,
            sync_dist=True,
        )
        for term, value in terms.items():
            self.log(
                f"train/{term}",
                value,
                on_step=False,
                on_epoch=True,
                batch_size=batch_size,
                sync_dist=True,
            )
        return total

    def _update(self, metrics: nn.ModuleDict, batch: dict, output: dict[str, Tensor]) -> None:
        labels = batch["label"].long()
        masks = batch["mask"].squeeze(1).long()
        metrics["image_auroc"].update(output["pred_score"], labels)
        metrics["pixel_auroc"].update(output["anomaly_map"], masks)
        metrics["pixel_aupro"].update(output["anomaly_map"], masks)
        if "image_f1_max" in metrics:
            metrics["image_f1_max"].update(output["pred_score"], labels)
            metrics["pixel_f1_max"].update(output["anomaly_map"], masks)

    def on_validation_epoch_start(self) -> None:
        self._normal_sums: list[Tensor] = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        output = self(batch["image"])
        self._update(self.val_metrics, batch, output)
        normal = batch["label"] == 0
        if normal.any():
            maps = output["anomaly_map"][normal].double()
            sums = [maps.new_tensor(float(len(maps))), maps.sum(0), maps.pow(2).sum(0)]
            if self._normal_sums:
                sums = [a + b for a, b in zip(self._normal_sums, sums, strict=True)]
            self._normal_sums = sums
            # Reconstruction loss of the held-out normals: a signal that needs no anomalies.
            loss, _ = self.loss(output["reconstruction"][normal], batch["image"][normal], None)
            self.log("val/loss", loss, on_epoch=True, batch_size=int(normal.sum()), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        for key, metric in self.val_metrics.items():
            self.log(f"val/{key}", metric.compute(), prog_bar=key == "image_auroc")
            metric.reset()
        if self._normal_sums and not self.trainer.sanity_checking:
            # Statistics of the held-out normals' maps, summed over all ranks, for the next
            # scores (and saved with this epoch's checkpoint).
            sums = [self.trainer.strategy.reduce(t, reduce_op="sum") for t in self._normal_sums]
            self.scorer.fit_normal_statistics(*(t.float() for t in sums))

    def on_test_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        self.defect_types = list(getattr(datamodule, "test_defect_types", []))
        if self.defect_types:
            self.test_per_defect = PerGroupAUROC(len(self.defect_types)).to(self.device)

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        output = self(batch["image"])
        self._update(self.test_metrics, batch, output)
        if self.test_per_defect is not None:
            index = {name: i for i, name in enumerate(self.defect_types)}
            groups = torch.tensor([index[d] for d in batch["defect_type"]], device=self.device)
            self.test_per_defect.update(output["pred_score"], batch["label"].long(), groups)
        return output

    def on_test_epoch_end(self) -> None:
        results = {}
        for key, metric in self.test_metrics.items():
            value = metric.compute()
            self.log(f"test/{key}", value)
            results[key] = float(value)
            metric.reset()
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

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        return self(batch["image"])

    def configure_optimizers(self):
        optimizer = self.hparams.optimizer(params=self.parameters())
        if self.hparams.scheduler is None:
            return optimizer
        scheduler = self.hparams.scheduler(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }
