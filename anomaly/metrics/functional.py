"""Anomaly detection metrics: exact AUROC, F1-max and AUPRO, plus torchmetrics wrappers for DDP.

Scores are raw anomaly scores of any magnitude, so nothing here squashes them through a sigmoid
(torchmetrics' binary AUROC does for scores outside [0, 1], which saturates large float32 scores to
1.0 and invents ties). Every metric is exact over all thresholds, ties included.

Speed: the scores of each class are sorted apart (a plain value sort, several times faster than
an argsort), and every count "how many of the other class score below this one" is a binary
search into a sorted array. Float32 maps stay float32 (the order, and so the metric, is that of
the values; no widening needed), anything else is compared in float64. Counts are integers and
AUROC is their exact ratio.

References:
    Fawcett, "An introduction to ROC analysis", Pattern Recognition Letters 27(8), 2006.
    Mann and Whitney, "On a test of whether one of two random variables is stochastically larger
    than the other", Annals of Mathematical Statistics 18(1), 1947.
    Bergmann et al., "The MVTec Anomaly Detection Dataset: A Comprehensive Real-World Dataset for
    Unsupervised Anomaly Detection", IJCV 129, 2021 (per-region overlap, AUPRO).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor


def check_binary(preds: Tensor, target: Tensor) -> None:
    if preds.shape != target.shape:
        raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ")
    if preds.is_floating_point() and torch.isnan(preds).any():
        raise ValueError("preds contain nan")
    if ((target != 0) & (target != 1)).any():
        raise ValueError("target must contain only 0 and 1")


def _scalar(value: float, like: Tensor) -> Tensor:
    """A 0-dim float64 tensor on the device of the inputs."""
    return torch.tensor(value, dtype=torch.float64, device=like.device)


def _as_array(values: Tensor) -> np.ndarray:
    """A flat numpy view of scores: float32 as they are, every other dtype as float64."""
    values = values.detach().cpu().flatten()
    return values.numpy() if values.dtype == torch.float32 else values.double().numpy()


def _sorted_by_class(preds: Tensor, target: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The ascending scores of the positives and of the negatives."""
    check_binary(preds, target)
    scores, positive = _as_array(preds), target.detach().cpu().flatten().bool().numpy()
    return np.sort(scores[positive]), np.sort(scores[~positive])


def _weight_below(reference: np.ndarray, weights: np.ndarray | None, queries, side: str):
    """Total weight of the ascending `reference` scores below each query.

    Args:
        reference: (R,) ascending scores.
        weights: (R,) integer weights of `reference`, or None for one each.
        queries: (Q,) scores, fastest when ascending.
        side: "left" counts scores < query, "right" scores <= query.
    """
    index = np.searchsorted(reference, queries, side)
    if weights is None:
        return index
    return np.concatenate([[0], np.cumsum(weights)])[index]


def _total(scores: np.ndarray, weights: np.ndarray | None) -> int:
    return len(scores) if weights is None else int(weights.sum())


def _auroc_sorted(positive, negative, positive_weights=None, negative_weights=None) -> float:
    """Mann-Whitney AUROC of ascending class scores with optional integer weights."""
    num_pos = _total(positive, positive_weights)
    num_neg = _total(negative, negative_weights)
    if num_pos == 0 or num_neg == 0:
        return math.nan
    # Per positive: 2 * (negatives below) + (tied negatives) = (below) + (below or tied).
    twice_wins = _weight_below(negative, negative_weights, positive, "left") + _weight_below(
        negative, negative_weights, positive, "right"
    )
    if positive_weights is not None:
        twice_wins = twice_wins * positive_weights
    return int(twice_wins.sum(dtype=np.int64)) / (2 * num_pos * num_neg)


def _f1_max_sorted(positive, negative, positive_weights=None, negative_weights=None) -> float:
    """Best F1 of ascending class scores with optional integer weights, over all thresholds."""
    num_pos = _total(positive, positive_weights)
    if num_pos == 0:
        return math.nan
    # Predicting positive for score >= t, a threshold between positives is beaten by the next
    # positive score above it (same true positives, no more false ones): only those are tried.
    true_pos = num_pos - _weight_below(positive, positive_weights, positive, "left")
    false_pos = _total(negative, negative_weights) - _weight_below(
        negative, negative_weights, positive, "left"
    )
    # F1 = 2 TP / (2 TP + FP + FN) and TP + FN is the number of positives.
    return float((2 * true_pos / (true_pos + false_pos + num_pos)).max())


def auroc(preds: Tensor, target: Tensor) -> Tensor:
    """Exact binary ROC AUC over all thresholds, ties counted by the trapezoidal rule.

    Equal to sklearn's ``roc_auc_score`` and to P(s+ > s-) + P(s+ = s-) / 2 over all
    positive/negative pairs (Fawcett 2006; the Mann-Whitney statistic).

    Args:
        preds: scores of any shape and magnitude, higher means more anomalous.
        target: same shape as ``preds``, values in {0, 1}.

    Returns:
        0-dim float64 tensor; nan if either class is absent.
    """
    return _scalar(_auroc_sorted(*_sorted_by_class(preds, target)), preds)


def f1_max(preds: Tensor, target: Tensor) -> Tensor:
    """Maximum F1 score over all thresholds t, predicting positive when score >= t.

    Args:
        preds: scores of any shape and magnitude.
        target: same shape as ``preds``, values in {0, 1}.

    Returns:
        0-dim float64 tensor; nan if there are no positives.
    """
    return _scalar(_f1_max_sorted(*_sorted_by_class(preds, target)), preds)


def roc_curve(
    preds: Tensor, target: Tensor, max_points: int | None = None
) -> tuple[Tensor, Tensor]:
    """ROC curve over all distinct thresholds, or exact points at up to ``max_points`` of them.

    Args:
        preds: scores of any shape and magnitude.
        target: same shape as ``preds``, values in {0, 1}.
        max_points: None for every distinct threshold; else thresholds at evenly spaced ranks of
            each class (the lowest score of each included), enough for a plot of millions of
            pixels.

    Returns:
        (fpr, tpr), each (T + 1,) float64 from (0, 0) to (1, 1).
    """
    positive, negative = _sorted_by_class(preds, target)
    parts = [positive, negative]
    if max_points is not None:
        parts = [
            part[np.unique(np.linspace(0, len(part) - 1, max(max_points // 2, 2)).astype(int))]
            for part in parts
            if len(part)
        ]
    thresholds = np.unique(np.concatenate(parts))[::-1]
    rates = []
    for part in (negative, positive):
        # The share of the class scoring >= each threshold, after (0, 0) above every score.
        at_least = len(part) - np.searchsorted(part, thresholds, "left")
        rates.append(np.concatenate([[0.0], at_least / max(len(part), 1)]))
    fpr, tpr = (torch.from_numpy(rate).to(preds.device) for rate in rates)
    return fpr, tpr


def region_labels(masks: Tensor) -> tuple[np.ndarray, int]:
    """(N*H*W,) region ids of (N, H, W) masks, 0 for normal pixels, and the number of regions.

    Regions are 8-connected within an image and never span two images: one label call for the
    whole set.
    """
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    labels, num_regions = ndimage.label(masks.detach().cpu().numpy(), structure=structure)
    return labels.ravel(), num_regions


def _area_under_pro(counts, pro_above, pro_at_least, num_normal: int, fpr_limit: float) -> float:
    """Normalized area under the PRO curve from its steps at the normal scores.

    The curve moves right only at normal scores: the tied normals at a threshold v take FPR from
    (normals > v) to (normals >= v) while PRO goes from pro(> v) to pro(>= v) in a straight line.

    Args:
        counts: (S,) normal pixels at each distinct normal score, ascending, every score above
            the first one included (>= 1 each).
        pro_above: (S,) mean region overlap of the scores above each of them.
        pro_at_least: (S,) the same with the scores equal to them included.
        num_normal: all normal pixels.
        fpr_limit: upper FPR bound of the integral.
    """
    limit = fpr_limit * num_normal  # in normal pixels
    at_least = np.cumsum(counts[::-1])[::-1]
    above = at_least - counts
    # Steps wholly under the limit count whole; the one across it is cut and interpolated.
    width = np.clip(np.minimum(at_least, limit) - above, 0, None)
    pro_end = pro_above + (pro_at_least - pro_above) * width / counts
    return float(np.sum(width * (pro_above + pro_end) / 2)) / num_normal / fpr_limit


def _check_maps_and_masks(maps: Tensor, masks: Tensor) -> None:
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise ValueError(
            f"need maps and masks of equal shape (N, H, W), got {tuple(maps.shape)} "
            f"and {tuple(masks.shape)}"
        )
    check_binary(maps, masks)


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


def pixel_metrics(maps: Tensor, masks: Tensor, fpr_limit: float = 0.3) -> dict[str, Tensor]:
    """Pixel AUROC, F1-max and AUPRO of a set of maps, from one sort of its normal pixels.

    Args:
        maps: (N, H, W) anomaly maps.
        masks: (N, H, W) ground-truth masks with values in {0, 1}.
        fpr_limit: upper FPR bound of the AUPRO integral, in (0, 1].

    Returns:
        0-dim float64 tensors `pixel_auroc`, `pixel_f1_max` and `pixel_aupro` (see `auroc`,
        `f1_max` and `aupro`); nan where a class or region is missing.
    """
    _check_maps_and_masks(maps, masks)
    _check_fpr_limit(fpr_limit)
    labels, num_regions = region_labels(masks)
    scores = _as_array(maps)
    in_region = labels > 0
    normal = np.sort(scores[~in_region])
    region_of_pixel = labels[in_region]
    order = np.argsort(scores[in_region], kind="stable")
    defect = scores[in_region][order]
    results = {
        "pixel_auroc": _auroc_sorted(defect, normal),
        "pixel_f1_max": _f1_max_sorted(defect, normal),
        "pixel_aupro": math.nan,
    }
    if num_regions > 0 and len(normal) > 0:
        # Each region's pixels weigh 1 / size, so a region's pixels >= t sum to its overlap.
        weights = 1.0 / np.bincount(region_of_pixel)[region_of_pixel[order]]
        # overlap_from[i]: the weight of defect[i:], summed from the top so tails stay exact.
        overlap_from = np.concatenate([np.cumsum(weights[::-1])[::-1], [0.0]]) / num_regions

        # Only the normal scores down to the one whose step crosses the FPR limit matter.
        crossing = normal[len(normal) - math.ceil(fpr_limit * len(normal))]
        head = normal[np.searchsorted(normal, crossing, "left") :]
        starts = np.concatenate([[0], np.flatnonzero(np.diff(head)) + 1])
        values = head[starts]
        counts = np.diff(np.concatenate([starts, [len(head)]]))
        # Rounding in the sums of 1 / size may overshoot 1 by an ulp.
        pro_above, pro_at_least = (
            np.minimum(overlap_from[np.searchsorted(defect, values, side)], 1.0)
            for side in ("right", "left")
        )
        results["pixel_aupro"] = _area_under_pro(
            counts, pro_above, pro_at_least, len(normal), fpr_limit
        )
    return {key: _scalar(value, maps) for key, value in results.items()}


def pixel_metrics_from_histograms(
    normal: Tensor, defect: Tensor, overlap: Tensor, num_regions: int, fpr_limit: float = 0.3
) -> dict[str, Tensor]:
    """Pixel AUROC, F1-max and AUPRO of maps binned into ascending bins (one bin, one tie).

    Args:
        normal: (T,) integer counts of normal pixels per bin, lowest scores first.
        defect: (T,) integer counts of defect pixels per bin.
        overlap: (T,) float64 sums over defect pixels of 1 / (their region's size).
        num_regions: the number of defect regions.
        fpr_limit: upper FPR bound of the AUPRO integral, in (0, 1].

    Returns:
        The keys of `pixel_metrics`.
    """
    _check_fpr_limit(fpr_limit)
    normal_np, defect_np = normal.cpu().numpy(), defect.cpu().numpy()
    bins = np.arange(len(normal_np))
    results = {
        "pixel_auroc": _auroc_sorted(bins, bins, defect_np, normal_np),
        "pixel_f1_max": _f1_max_sorted(bins, bins, defect_np, normal_np),
        "pixel_aupro": math.nan,
    }
    num_normal = int(normal_np.sum())
    if num_regions > 0 and num_normal > 0:
        overlap_from = np.concatenate([np.cumsum(overlap.cpu().numpy()[::-1])[::-1], [0.0]])
        pro = np.minimum(overlap_from / num_regions, 1.0)
        used = normal_np > 0
        results["pixel_aupro"] = _area_under_pro(
            normal_np[used], pro[1:][used], pro[:-1][used], num_normal, fpr_limit
        )
    return {key: _scalar(value, normal) for key, value in results.items()}


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
    return pixel_metrics(maps, masks, fpr_limit)["pixel_aupro"]
