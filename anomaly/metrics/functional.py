"""Anomaly detection metrics: exact AUROC, F1-max and AUPRO, plus torchmetrics wrappers for DDP.

Scores are raw anomaly scores of any magnitude, so nothing here squashes them through a sigmoid
(torchmetrics' binary AUROC does for scores outside [0, 1], which saturates large float32 scores to
1.0 and invents ties). Everything is computed in float64 from one sort of the scores.

References:
    Fawcett, "An introduction to ROC analysis", Pattern Recognition Letters 27(8), 2006.
    Bergmann et al., "The MVTec Anomaly Detection Dataset: A Comprehensive Real-World Dataset for
    Unsupervised Anomaly Detection", IJCV 129, 2021 (per-region overlap, AUPRO).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor


def _cumulative_at_thresholds(scores: Tensor, weights: Tensor) -> Tensor:
    """Sums the weights of all samples scoring at least each distinct threshold.

    Tied samples enter together, so every row is one point of a curve over thresholds.

    Args:
        scores: (M,) float64 scores.
        weights: (M, K) float64 weights per sample (e.g. positive and negative indicators).

    Returns:
        (T + 1, K) cumulative weights for the T distinct scores taken as thresholds in descending
        order, after a first row of zeros (a threshold above every score).
    """
    order = torch.argsort(scores, descending=True, stable=True)
    sorted_scores = scores[order]
    cumulative = weights[order].cumsum(0)
    # Keep only the last sample of each run of ties: the point where the whole tie has entered.
    last_of_tie = torch.ones_like(sorted_scores, dtype=torch.bool)
    last_of_tie[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    return torch.cat([weights.new_zeros(1, weights.shape[1]), cumulative[last_of_tie]])


def auroc_from_weights(scores: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
    """ROC AUC from (M,) float64 scores and (M,) class weights; nan if a class is absent."""
    true_pos, false_pos = _cumulative_at_thresholds(scores, torch.stack([positive, negative], 1)).T
    # Trapezoids on raw counts count a tied positive/negative pair as half a correct ranking.
    area = torch.trapezoid(true_pos, false_pos)
    return area / (true_pos[-1] * false_pos[-1])


def f1_max_from_weights(scores: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
    """Best F1 over thresholds from (M,) float64 scores and (M,) weights; nan without positives."""
    true_pos, false_pos = _cumulative_at_thresholds(scores, torch.stack([positive, negative], 1)).T
    num_pos = true_pos[-1]
    # F1 = 2 TP / (2 TP + FP + FN) and TP + FN is the number of positives.
    f1 = 2 * true_pos / (true_pos + false_pos + num_pos)
    return torch.where(num_pos > 0, f1.max(), torch.nan)


def check_binary(preds: Tensor, target: Tensor) -> None:
    if preds.shape != target.shape:
        raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ")
    if preds.is_floating_point() and torch.isnan(preds).any():
        raise ValueError("preds contain nan")
    if ((target != 0) & (target != 1)).any():
        raise ValueError("target must contain only 0 and 1")


def _from_labels(from_weights, preds: Tensor, target: Tensor) -> Tensor:
    """A metric of class weights applied to scores and {0, 1} labels of any equal shape."""
    check_binary(preds, target)
    target = target.flatten().double()
    return from_weights(preds.flatten().double(), target, 1 - target)


def auroc(preds: Tensor, target: Tensor) -> Tensor:
    """Exact binary ROC AUC over all thresholds, ties counted by the trapezoidal rule.

    Equal to sklearn's ``roc_auc_score`` and to P(s+ > s-) + P(s+ = s-) / 2 over all
    positive/negative pairs (Fawcett 2006).

    Args:
        preds: scores of any shape and magnitude, higher means more anomalous.
        target: same shape as ``preds``, values in {0, 1}.

    Returns:
        0-dim float64 tensor; nan if either class is absent.
    """
    return _from_labels(auroc_from_weights, preds, target)


def roc_curve(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """ROC curve over all distinct thresholds, for plots.

    Args:
        preds: scores of any shape and magnitude.
        target: same shape as ``preds``, values in {0, 1}.

    Returns:
        (fpr, tpr), each (T + 1,) float64 from (0, 0) to (1, 1).
    """
    check_binary(preds, target)
    target = target.flatten().double()
    weights = torch.stack([target, 1 - target], 1)
    true_pos, false_pos = _cumulative_at_thresholds(preds.flatten().double(), weights).T
    return false_pos / false_pos[-1].clamp(min=1), true_pos / true_pos[-1].clamp(min=1)


def f1_max(preds: Tensor, target: Tensor) -> Tensor:
    """Maximum F1 score over all thresholds t, predicting positive when score >= t.

    Args:
        preds: scores of any shape and magnitude.
        target: same shape as ``preds``, values in {0, 1}.

    Returns:
        0-dim float64 tensor; nan if there are no positives.
    """
    return _from_labels(f1_max_from_weights, preds, target)


def _area_up_to(x: Tensor, y: Tensor, limit: float) -> Tensor:
    """Trapezoidal area under y(x) for x in [0, limit]; x (P,) nondecreasing from 0, y (P,)."""
    limit_t = x.new_tensor([limit])
    inside = int(torch.searchsorted(x, limit_t, right=True))  # x[:inside] <= limit
    xs, ys = x[:inside], y[:inside]
    if inside < len(x):
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        xs, ys = torch.cat([xs, limit_t]), torch.cat([ys, y_limit[None]])
    return torch.trapezoid(ys, xs)


def aupro(maps: Tensor, masks: Tensor, fpr_limit: float = 0.3) -> Tensor:
    """Normalized area under the per-region-overlap curve up to a false positive rate.

    Follows Bergmann et al. (IJCV 2021): regions are the 8-connected components of each image's
    mask; for a threshold t, FPR is the fraction of all normal pixels of the set (defective images
    included) scoring >= t, and PRO is the mean over all regions of the fraction of the region
    scoring >= t. PRO is integrated over FPR in [0, fpr_limit] with the trapezoidal rule, exactly
    over every distinct threshold, then divided by ``fpr_limit``.

    Args:
        maps: (N, H, W) anomaly maps.
        masks: (N, H, W) ground-truth masks with values in {0, 1}.
        fpr_limit: upper FPR bound of the integral, in (0, 1].

    Returns:
        0-dim float64 tensor in [0, 1]; nan if there are no defect regions or no normal pixels.
    """
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise ValueError(
            f"need maps and masks of equal shape (N, H, W), got {tuple(maps.shape)} "
            f"and {tuple(masks.shape)}"
        )
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    check_binary(maps, masks)
    # 3x3 connectivity within an image and none across images: one label call for the whole set.
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    labels_np, num_regions = ndimage.label(masks.detach().cpu().numpy(), structure=structure)
    region_sizes = torch.from_numpy(np.bincount(labels_np.ravel())).to(maps.device, torch.float64)
    labels = torch.from_numpy(labels_np).to(maps.device).flatten()
    normal = (labels == 0).double()
    num_normal = int(normal.sum())
    if num_regions == 0 or num_normal == 0:
        return maps.new_tensor(torch.nan, dtype=torch.float64)
    # Each region's pixels carry 1 / size, so a region sums to its overlap fraction.
    overlap = torch.where(labels > 0, 1.0 / region_sizes[labels], 0.0)
    cumulative = _cumulative_at_thresholds(
        maps.flatten().double(), torch.stack([normal, overlap], 1)
    )
    fpr = cumulative[:, 0] / num_normal
    # Rounding in the sums of 1 / size may overshoot 1 by an ulp.
    pro = (cumulative[:, 1] / num_regions).clamp(max=1.0)
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit
