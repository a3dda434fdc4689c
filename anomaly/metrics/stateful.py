"""torchmetrics objects for the metrics of `anomaly.metrics.functional`, exact under DDP.

Each keeps its inputs (or fixed-bin histograms) as states that torchmetrics gathers or sums
across ranks, then computes the exact metric once.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from anomaly.metrics.functional import (
    auroc,
    check_binary,
    f1_max,
    pixel_metrics,
    pixel_metrics_from_histograms,
    region_labels,
)


class _ImageScoreMetric(Metric):
    """Keeps (B,) scores and {0, 1} labels ("cat" states) for one exact metric over all."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Adds a batch of scores and {0, 1} labels of the same (any) shape."""
        check_binary(preds, target)
        self.preds.append(preds.detach().flatten())
        self.target.append(target.detach().flatten().to(torch.uint8))

    def compute(self) -> Tensor:
        """Returns the 0-dim float64 metric over everything accumulated."""
        return self._metric(dim_zero_cat(self.preds), dim_zero_cat(self.target))

    @staticmethod
    def _metric(preds: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError


class AUROC(_ImageScoreMetric):
    """Binary ROC AUC on raw scores, exact under DDP."""

    _metric = staticmethod(auroc)


class F1Max(_ImageScoreMetric):
    """Maximum F1 over thresholds on raw scores, exact under DDP."""

    _metric = staticmethod(f1_max)


class PixelMetrics(Metric):
    """Pixel AUROC, F1-max and AUPRO (see `pixel_metrics`) from one copy of the maps.

    Args:
        thresholds: None keeps every map (exact, memory grows with the set); an int keeps three
            histograms of that many equal-width bins over ``score_range`` instead (memory fixed,
            scores clamped into the range, pixels in one bin counted as ties).
        score_range: (low, high) range of the histogram bins.
        fpr_limit: upper FPR bound of the AUPRO integral, in (0, 1].
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        thresholds: int | None = None,
        score_range: tuple[float, float] = (0.0, 1.0),
        fpr_limit: float = 0.3,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if thresholds is not None and (not isinstance(thresholds, int) or thresholds < 2):
            raise ValueError(f"thresholds must be None or an int >= 2, got {thresholds!r}")
        if not score_range[0] < score_range[1]:
            raise ValueError(f"score_range must be (low, high) with low < high, got {score_range}")
        if not 0 < fpr_limit <= 1:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        self.thresholds = thresholds
        self.score_range = (float(score_range[0]), float(score_range[1]))
        self.fpr_limit = fpr_limit
        if thresholds is None:
            self.add_state("maps", default=[], dist_reduce_fx="cat")
            self.add_state("masks", default=[], dist_reduce_fx="cat")
        else:
            counts = torch.zeros(thresholds, dtype=torch.long)
            self.add_state("normal_hist", default=counts.clone(), dist_reduce_fx="sum")
            self.add_state("defect_hist", default=counts.clone(), dist_reduce_fx="sum")
            overlap = torch.zeros(thresholds, dtype=torch.float64)
            self.add_state("overlap_hist", default=overlap, dist_reduce_fx="sum")
            self.add_state("num_regions", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, maps: Tensor, masks: Tensor) -> None:
        """Adds (B, H, W) anomaly maps and their (B, H, W) or (B, 1, H, W) {0, 1} masks."""
        if masks.ndim == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        if maps.ndim != 3 or maps.shape != masks.shape:
            raise ValueError(
                f"need maps (B, H, W) and masks of the same shape, got "
                f"{tuple(maps.shape)} and {tuple(masks.shape)}"
            )
        check_binary(maps, masks)
        maps, masks = maps.detach(), masks.detach().to(torch.uint8)
        if self.thresholds is None:
            self.maps.append(maps)
            self.masks.append(masks)
            return
        # Regions never span two images, so each batch's regions are final.
        labels, num_regions = region_labels(masks)
        low, high = self.score_range
        scaled = (maps.double().flatten().clamp(low, high) - low) / (high - low) * self.thresholds
        bins = scaled.long().clamp(max=self.thresholds - 1).cpu().numpy()  # top edge: last bin
        in_region = labels > 0
        sizes = np.bincount(labels)
        per_bin = {
            "normal_hist": np.bincount(bins[~in_region], minlength=self.thresholds),
            "defect_hist": np.bincount(bins[in_region], minlength=self.thresholds),
            "overlap_hist": np.bincount(
                bins[in_region], weights=1.0 / sizes[labels[in_region]], minlength=self.thresholds
            ),
        }
        for name, values in per_bin.items():
            state = getattr(self, name)
            state += torch.from_numpy(values).to(state)
        self.num_regions += num_regions

    def compute(self) -> dict[str, Tensor]:
        """Returns 0-dim float64 `pixel_auroc`, `pixel_f1_max` and `pixel_aupro`."""
        if self.thresholds is None:
            maps, masks = dim_zero_cat(self.maps), dim_zero_cat(self.masks)
            return pixel_metrics(maps, masks, self.fpr_limit)
        return pixel_metrics_from_histograms(
            self.normal_hist,
            self.defect_hist,
            self.overlap_hist,
            int(self.num_regions),
            self.fpr_limit,
        )


class PerGroupAUROC(Metric):
    """Image AUROC per group (defect type): all normal images against the anomalous ones of a group.

    Args:
        num_groups: number of groups; group ids are in [0, num_groups).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_groups: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
        self.num_groups = num_groups
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("groups", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, labels: Tensor, groups: Tensor) -> None:
        """Adds (B,) scores, (B,) {0, 1} labels and (B,) integer group ids."""
        if scores.ndim != 1 or labels.shape != scores.shape or groups.shape != scores.shape:
            raise ValueError(
                f"need scores, labels, groups of equal shape (B,), got "
                f"{tuple(scores.shape)}, {tuple(labels.shape)}, {tuple(groups.shape)}"
            )
        check_binary(scores, labels)
        if groups.is_floating_point() or ((groups < 0) | (groups >= self.num_groups)).any():
            raise ValueError(f"groups must be integers in [0, {self.num_groups})")
        self.scores.append(scores.detach())
        self.labels.append(labels.detach().to(torch.uint8))
        self.groups.append(groups.detach().long())

    def compute(self) -> Tensor:
        """Returns (num_groups,) float64 AUROCs; nan for a group without anomalous images."""
        scores = dim_zero_cat(self.scores)
        labels = dim_zero_cat(self.labels)
        groups = dim_zero_cat(self.groups)
        normal = labels == 0
        results = []
        for group in range(self.num_groups):
            # Non-normal images that belong to the group are exactly its anomalous images.
            chosen = normal | (groups == group)
            results.append(auroc(scores[chosen], labels[chosen]))
        return torch.stack(results)
