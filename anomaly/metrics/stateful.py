"""torchmetrics objects for the metrics of `anomaly.metrics.functional`, exact under DDP.

Each keeps its inputs (or fixed-bin histograms) as states that torchmetrics gathers or sums
across ranks, then computes the exact metric once.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from anomaly.metrics.functional import aupro, auroc_from_weights, check_binary, f1_max_from_weights


class _BinaryScoreMetric(Metric):
    """Exact ("cat" states) or histogram ("sum" states) accumulation of binary scores."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        thresholds: int | None = None,
        score_range: tuple[float, float] = (0.0, 1.0),
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if thresholds is not None and (not isinstance(thresholds, int) or thresholds < 2):
            raise ValueError(f"thresholds must be None or an int >= 2, got {thresholds!r}")
        if not score_range[0] < score_range[1]:
            raise ValueError(f"score_range must be (low, high) with low < high, got {score_range}")
        self.thresholds = thresholds
        self.score_range = (float(score_range[0]), float(score_range[1]))
        if thresholds is None:
            self.add_state("preds", default=[], dist_reduce_fx="cat")
            self.add_state("target", default=[], dist_reduce_fx="cat")
        else:
            zeros = torch.zeros(thresholds, dtype=torch.long)
            self.add_state("positive_hist", default=zeros.clone(), dist_reduce_fx="sum")
            self.add_state("negative_hist", default=zeros.clone(), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Adds a batch of scores and {0, 1} labels of the same (any) shape."""
        check_binary(preds, target)
        preds, target = preds.detach().flatten(), target.detach().flatten().to(torch.uint8)
        if self.thresholds is None:
            self.preds.append(preds)
            self.target.append(target)
            return
        low, high = self.score_range
        scaled = (preds.double().clamp(low, high) - low) / (high - low) * self.thresholds
        bins = scaled.long().clamp(max=self.thresholds - 1)  # the top edge belongs to the last bin
        # One bincount for both classes: positives are offset by one histogram length.
        counts = torch.bincount(
            bins + self.thresholds * target.long(), minlength=2 * self.thresholds
        )
        self.negative_hist += counts[: self.thresholds]
        self.positive_hist += counts[self.thresholds :]

    def compute(self) -> Tensor:
        """Returns the 0-dim float64 metric over everything accumulated."""
        if self.thresholds is None:
            target = dim_zero_cat(self.target).double()
            return self._from_weights(dim_zero_cat(self.preds).double(), target, 1 - target)
        bin_scores = torch.arange(
            self.thresholds, device=self.positive_hist.device, dtype=torch.float64
        )
        return self._from_weights(
            bin_scores, self.positive_hist.double(), self.negative_hist.double()
        )

    @staticmethod
    def _from_weights(scores: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        raise NotImplementedError


class AUROC(_BinaryScoreMetric):
    """Binary ROC AUC on raw scores, exact under DDP.

    Args:
        thresholds: None keeps every score (exact); an int keeps two histograms of that many
            equal-width bins over ``score_range`` (bounded memory, scores clamped into the range,
            samples in one bin counted as ties).
        score_range: (low, high) range of the histogram bins.
    """

    _from_weights = staticmethod(auroc_from_weights)


class F1Max(_BinaryScoreMetric):
    """Maximum F1 over thresholds on raw scores, exact under DDP; arguments as in `AUROC`."""

    _from_weights = staticmethod(f1_max_from_weights)


class AUPRO(Metric):
    """Per-region-overlap AUC up to ``fpr_limit`` (see `aupro`), exact under DDP.

    Args:
        fpr_limit: upper FPR bound of the integral, in (0, 1].
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, fpr_limit: float = 0.3, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0 < fpr_limit <= 1:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        self.fpr_limit = fpr_limit
        self.add_state("maps", default=[], dist_reduce_fx="cat")
        self.add_state("masks", default=[], dist_reduce_fx="cat")

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
        self.maps.append(maps.detach())
        self.masks.append(masks.detach().to(torch.uint8))

    def compute(self) -> Tensor:
        """Returns the 0-dim float64 AUPRO over all accumulated images."""
        return aupro(dim_zero_cat(self.maps), dim_zero_cat(self.masks), self.fpr_limit)


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
        scores = dim_zero_cat(self.scores).double()
        labels = dim_zero_cat(self.labels).double()
        groups = dim_zero_cat(self.groups)
        normal = labels == 0
        results = []
        for group in range(self.num_groups):
            # Non-normal images that belong to the group are exactly its anomalous images.
            chosen = normal | (groups == group)
            results.append(auroc_from_weights(scores[chosen], labels[chosen], 1 - labels[chosen]))
        return torch.stack(results)
