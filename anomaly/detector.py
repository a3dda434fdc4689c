"""`AnomalyDetector`: images in, anomaly map and image score out. Pure torch, one inference path.

Validation, test, evaluation and the benchmarks all call the same object, and it is saved whole
in checkpoints (network weights and the normal-image statistics as buffers), so a detector that
was trained is the detector that scores.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from anomaly.anomaly_map import AnomalyMap
from anomaly.errors import ConfigError
from anomaly.metrics.functional import auroc

# The smallest spread of a standardized score: maps are errors of images in [0, 1].
MIN_SPREAD = 1e-6
# How the verdict threshold is chosen on validation scores (`calibrate_threshold`).
THRESHOLD_METHODS = ("f1_max", "fpr")
# `score.standardize`: always, never, or where it ranks validation anomalies better.
STANDARDIZE_CHOICES = (True, False, "auto")
# The smallest spread of an image's levels that `normalize_levels` divides by (a flat image).
MIN_LEVEL_SPREAD = 1e-3


def calibrate_threshold(
    scores: Tensor, labels: Tensor, method: str = "fpr", fpr: float = 0.01
) -> float:
    """The score from which an image is called anomalous (score >= threshold).

    Chosen on validation only (held-out normal images and their synthetic anomalies).

    Args:
        scores: (N,) image scores.
        labels: (N,) 1 for anomalous, 0 for normal; at least one normal.
        method: "f1_max": the anomalous score of the best F1 (the highest one on ties), the
            classes weighted alike (each anomalous image counts n_normal / n_anomalous), so the
            number of synthetic copies per normal does not move it; "fpr": the lowest threshold
            that calls at most a share `fpr` of the normal images anomalous. Without anomalous
            images, "f1_max" falls back to "fpr" (it would call everything anomalous).
        fpr: the false-positive share of method "fpr", in [0, 1).

    Returns:
        The threshold, a float.
    """
    if method not in THRESHOLD_METHODS:
        raise ConfigError(f"threshold.method must be one of {THRESHOLD_METHODS}, got {method!r}")
    if not 0 <= fpr < 1:
        raise ConfigError(f"threshold.fpr must be in [0, 1), got {fpr}")
    scores, labels = scores.detach().double().cpu(), labels.detach().cpu().bool()
    normal, anomalous = scores[~labels].sort().values, scores[labels].sort().values
    if len(normal) == 0:
        raise ValueError("calibrating a threshold needs at least one normal image")
    if method == "f1_max" and len(anomalous) > 0:
        # Every candidate is an anomalous score: any other threshold is beaten by the next
        # anomalous score above it (the same true positives, no more false ones).
        weight = len(normal) / len(anomalous)
        true_pos = len(anomalous) - torch.searchsorted(anomalous, anomalous, right=False)
        false_pos = len(normal) - torch.searchsorted(normal, anomalous, right=False)
        f1 = 2 * weight * true_pos / (weight * true_pos + false_pos + weight * len(anomalous))
        best = f1 == f1.max()
        return float(anomalous[best].max())
    # Just above the (k+1)-th highest normal score: at most k = floor(fpr * N) normals reach it.
    allowed = math.floor(fpr * len(normal))
    return math.nextafter(float(normal.flip(0)[allowed]), math.inf)


def check_score_settings(top_k, top_share, standardize) -> None:
    """A ConfigError naming the first image-score setting out of range (`AnomalyDetector`)."""

    def number(value, kinds) -> bool:
        return not isinstance(value, bool) and isinstance(value, kinds)

    if top_k is not None and not (number(top_k, int) and top_k >= 1):
        raise ConfigError(f"top_k must be a positive number of pixels, got {top_k!r}")
    if top_share is not None and not (number(top_share, (int, float)) and 0 < top_share <= 1):
        raise ConfigError(f"score.top_share must be a share in (0, 1], got {top_share!r}")
    if top_k is not None and top_share is not None:
        raise ConfigError("set score.top_k or score.top_share, not both")
    if standardize not in STANDARDIZE_CHOICES:
        raise ConfigError(f"score.standardize must be true, false or auto, got {standardize!r}")


class AnomalyDetector(nn.Module):
    """A reconstruction network, its anomaly map and the image score.

    score = max of the map, or the mean of its largest pixels (`top_k` of them, or the share
    `top_share` of the map's pixels, so the same share at every image size). With `standardize`, the
    score is taken from the map standardized per pixel by the mean and spread of the maps of
    held-out normal images (`set_normal_statistics`, fitted during validation), so places that
    are always hard to reconstruct (edges, prints) stop dominating the image score. That assumes
    aligned objects: where they lie at random positions, "auto" lets every validation decide
    (`choose_standardization`). The returned map stays the raw one.

    With `normalize_levels`, each image's levels are mapped linearly (gain and offset) to the
    mean and spread of the training images' levels (`set_reference_levels`) before the network
    sees it, and the map compares that image with its reconstruction: the map does not follow
    the light. An image 10% darker, or with less contrast, gets the same map (up to levels
    clipped at 0 or 1).

    Args:
        net: (B, 3, H, W) in [0, 1] -> reconstruction (B, 3, H, W).
        anomaly_map: (image, reconstruction) -> map (B, H, W).
        top_k: image score = mean of the top-k map pixels instead of the maximum.
        top_share: image score = mean of this share, in (0, 1], of the map's pixels (at least
            one) instead of the maximum; not with `top_k`.
        standardize: True: score the standardized map once normal statistics are set; False:
            the raw map; "auto": whichever `choose_standardization` picked last (raw until then).
        normalize_levels: map each image's levels to the training images' (once they are set).
    """

    def __init__(
        self,
        net: nn.Module,
        anomaly_map: AnomalyMap,
        top_k: int | None = None,
        standardize: bool | str = False,
        normalize_levels: bool = False,
        top_share: float | None = None,
    ) -> None:
        super().__init__()
        check_score_settings(top_k, top_share, standardize)
        self.net, self.anomaly_map = net, anomaly_map
        self.top_k, self.top_share, self.standardize = top_k, top_share, standardize
        self.normalize_levels = normalize_levels
        # The training images' mean level and spread of levels, [mean, spread]; empty until set.
        self.register_buffer("reference_levels", torch.empty(0))
        # Per-pixel statistics of normal maps (H, W); empty until set. Saved with the weights.
        self.register_buffer("normal_mean", torch.empty(0))
        self.register_buffer("normal_std", torch.empty(0))
        # Whether scores use the standardized map (with "auto": the last validation's choice),
        # saved as a buffer and mirrored as a Python bool, so tracing for export sees a constant.
        self.register_buffer("standardized", torch.tensor(standardize is True))
        self._standardized = standardize is True
        # The verdict threshold and the median normal score (validation); nan until calibrated.
        self.register_buffer("threshold", torch.tensor(math.nan, dtype=torch.float64))
        self.register_buffer("normal_median", torch.tensor(math.nan, dtype=torch.float64))

    @property
    def has_normal_statistics(self) -> bool:
        return self.normal_mean.numel() > 0

    @property
    def scores_standardized(self) -> bool:
        """Whether `score` standardizes the maps."""
        return self._standardized and self.has_normal_statistics

    @property
    def has_reference_levels(self) -> bool:
        return self.reference_levels.numel() > 0

    def set_reference_levels(self, mean: float, spread: float) -> None:
        """Store the training images' mean level and spread of levels (`image_levels`)."""
        self.reference_levels = torch.tensor(
            [mean, spread], dtype=torch.float32, device=self.reference_levels.device
        )

    def match_levels(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Images (B, 3, H, W) with their levels mapped to the reference ones, clipped to [0, 1],
        and the gain and offset (B, 1, 1, 1) each got; unchanged (gain 1, offset 0) without
        `normalize_levels` or before the reference is set."""
        ones = images.new_ones(images.shape[0], 1, 1, 1)
        if not (self.normalize_levels and self.has_reference_levels):
            return images, ones, ones * 0
        mean, spread = image_levels(images)
        gain = self.reference_levels[1] / spread.clamp(min=MIN_LEVEL_SPREAD)
        offset = self.reference_levels[0] - gain * mean
        gain, offset = gain.view(-1, 1, 1, 1), offset.view(-1, 1, 1, 1)
        return (images * gain + offset).clamp(0.0, 1.0), gain, offset

    def set_normal_statistics(self, mean: Tensor, std: Tensor) -> None:
        """Store the per-pixel mean and spread (H, W) of normal maps (`NormalMapStatistics`)."""
        self.normal_mean, self.normal_std = mean, std

    def compare_standardization(self, maps: Tensor, labels: Tensor) -> tuple[float, float] | None:
        """Image AUROC of validation maps (N, H, W), labels (N,) with 1 = anomalous, scored from
        the raw map and from the per-pixel standardized one: (raw, standardized).

        No normal map standardizes itself: each is standardized by the statistics of the other
        normals (leave one out), the anomalous maps by those of every normal, as test images are.
        (Halves of the normals were too few: statistics of 11 capsule maps inflate a held-out
        normal's standardized maximum far more than the 22 that test images meet.) None without
        both classes or with fewer than 3 normals.
        """
        normal = labels == 0
        if int(normal.sum()) < 3 or not bool((~normal).any()):
            return None
        count, total, total_sq = map_sums(maps[normal])
        standardized = torch.empty(len(maps), dtype=torch.float64, device=maps.device)
        mean, std = map_statistics(count, total, total_sq)
        standardized[~normal] = self._reduce((maps[~normal] - mean) / std).double()
        for i in normal.nonzero().flatten().tolist():
            own = maps[i].double()
            mean, std = map_statistics(count - 1, total - own, total_sq - own**2)
            standardized[i] = self._reduce(((maps[i] - mean) / std)[None]).double()[0]
        return float(auroc(self._reduce(maps), labels)), float(auroc(standardized, labels))

    def choose_standardization(
        self, maps: Tensor, labels: Tensor, comparison: tuple[float, float] | None = None
    ) -> bool:
        """With standardize "auto": score standardized maps from now on if that ranks these
        validation maps better than the raw ones (`compare_standardization`, or its result for
        these maps as `comparison`); raw where the comparison cannot be made. Returns whether
        scores are standardized."""
        if self.standardize == "auto":
            if comparison is None:
                comparison = self.compare_standardization(maps, labels)
            helps = comparison is not None and comparison[1] > comparison[0]
            self.standardized.fill_(helps)
            self._standardized = helps
        return self.scores_standardized

    @property
    def has_threshold(self) -> bool:
        return bool(torch.isfinite(self.threshold))

    def set_threshold(self, threshold: float, normal_median: float) -> None:
        """Store the verdict threshold and the median normal score (`calibrate_threshold`)."""
        self.threshold.fill_(threshold)
        self.normal_median.fill_(normal_median)

    def normalized_score(self, scores: Tensor) -> Tensor:
        """Scores (B,) on a 0-1 scale: the median normal score at 0, the threshold at 0.5.

        Linear in the score with the threshold's distance from the median as its unit (twice
        that distance is 1), clipped to [0, 1], so a score reaches 0.5 exactly when its verdict
        is anomalous, even for a threshold below the median; nan before calibration.
        """
        spread = (self.threshold - self.normal_median).clamp(min=MIN_SPREAD)
        return (0.5 + 0.5 * (scores.double() - self.threshold) / spread).clamp(0.0, 1.0)

    def verdict(self, scores: Tensor) -> Tensor:
        """(B,) True where a score reaches the threshold (anomalous); all False before it is set."""
        return scores.double() >= self.threshold

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Checkpoints from before level matching existed have no reference: images pass unchanged.
        state_dict.setdefault(prefix + "reference_levels", torch.empty(0))
        # The statistics' shape (the image size) and the reference's (set or not) come from it.
        for name in ("normal_mean", "normal_std", "reference_levels"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        # Checkpoints from before the choice existed standardized as their config said.
        state_dict.setdefault(prefix + "standardized", torch.tensor(self.standardize is True))
        # Checkpoints from before calibration existed have no threshold: it stays unset.
        for name in ("threshold", "normal_median"):
            state_dict.setdefault(prefix + name, torch.tensor(math.nan, dtype=torch.float64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._standardized = bool(self.standardized)

    def score(self, maps: Tensor) -> Tensor:
        """Image scores (B,) of anomaly maps (B, H, W)."""
        if self.scores_standardized:
            if self.normal_mean.shape != maps.shape[1:]:
                raise ConfigError(
                    f"normal statistics were fitted at {tuple(self.normal_mean.shape)} pixels but "
                    f"the maps are {tuple(maps.shape[1:])}; use the training image size"
                )
            maps = (maps - self.normal_mean) / self.normal_std
        return self._reduce(maps)

    def _reduce(self, maps: Tensor) -> Tensor:
        """(B,) the maximum, or the mean of the largest pixels, of each map (B, H, W)."""
        flat = maps.flatten(1)
        if self.top_k is not None:
            return flat.topk(min(self.top_k, flat.shape[1]), dim=1).values.mean(dim=1)
        if self.top_share is not None:
            count = max(1, round(self.top_share * maps.shape[1] * maps.shape[2]))
            return flat.topk(count, dim=1).values.mean(dim=1)
        return flat.amax(dim=1)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Detect anomalies in a batch.

        Args:
            images: (B, 3, H, W) in [0, 1].

        Returns:
            anomaly_map (B, H, W), score (B,) and reconstruction (B, 3, H, W).
        """
        matched, gain, offset = self.match_levels(images)
        reconstruction = self.net(matched)
        maps = self.anomaly_map(matched, reconstruction)
        # The reconstruction is handed back in the image's own levels.
        return maps, self.score(maps), (reconstruction - offset) / gain


def image_levels(images: Tensor) -> tuple[Tensor, Tensor]:
    """The mean level and the spread (standard deviation) of levels of each image (B, C, H, W),
    over all its pixels and channels: two (B,) tensors."""
    flat = images.flatten(1).float()
    return flat.mean(dim=1), flat.std(dim=1, correction=0)


class NormalMapStatistics(Metric):
    """Per-pixel mean and spread of normal images' anomaly maps, summed over batches and ranks.

    The states are float64 sums (count, sum, sum of squares), so torchmetrics' own DDP reduction
    gives the statistics of every rank's maps. Every rank must see at least one normal map.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        # Scalar zeros broadcast to the first batch's (H, W), whatever the image size.
        for name in ("count", "total", "total_sq"):
            self.add_state(
                name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
            )

    def update(self, maps: Tensor) -> None:
        """Adds normal anomaly maps (N, H, W)."""
        count, total, total_sq = map_sums(maps)
        self.count = self.count + count.to(self.count.device)
        self.total = self.total + total
        self.total_sq = self.total_sq + total_sq

    def compute(self) -> tuple[Tensor, Tensor]:
        """The per-pixel mean (H, W) and spread (H, W) of the maps added (`map_statistics`)."""
        return map_statistics(self.count, self.total, self.total_sq)


def map_sums(maps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The count, per-pixel sum and sum of squares (float64) of maps (N, H, W)."""
    maps = maps.detach().double()
    return torch.tensor(float(len(maps)), dtype=torch.float64), maps.sum(0), maps.pow(2).sum(0)


def map_statistics(count: Tensor, total: Tensor, total_sq: Tensor) -> tuple[Tensor, Tensor]:
    """The per-pixel mean (H, W) and spread (H, W), float32, of maps with these sums.

    The spread is the standard deviation plus its own average (at least `MIN_SPREAD`), so
    nearly constant pixels cannot blow up a standardized score and it is never zero.

    Raises:
        ValueError: fewer than 2 maps.
    """
    if count < 2:
        raise ValueError(f"the spread needs at least 2 normal maps, got {int(count)}")
    mean = total / count
    std = (total_sq / count - mean**2).clamp(min=0).sqrt()
    # Every map alike (std 0 everywhere) still gives a finite, positive floor.
    floor = std.mean().clamp(min=MIN_SPREAD)
    return mean.float(), (std + floor).float()


class ValidationMaps(Metric):
    """The validation maps (N, H, W) and labels (N,) of every rank, to score them again."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("maps", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, maps: Tensor, labels: Tensor) -> None:
        """Adds maps (B, H, W) and labels (B,)."""
        self.maps.append(maps.detach())
        self.labels.append(labels.detach().long())

    def compute(self) -> tuple[Tensor, Tensor]:
        return dim_zero_cat(self.maps), dim_zero_cat(self.labels)
