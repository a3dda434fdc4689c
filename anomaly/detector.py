"""`AnomalyDetector`: images in, anomaly map and image score out. Pure torch, one inference path.

Validation, test, evaluation and the benchmarks all call the same object, and it is saved whole
in checkpoints (network weights and the normal-image statistics as buffers), so a detector that
was trained is the detector that scores.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from anomaly.anomaly_map import AnomalyMap
from anomaly.errors import ConfigError

# The smallest spread of a standardized score: maps are errors of images in [0, 1].
MIN_SPREAD = 1e-6


class AnomalyDetector(nn.Module):
    """A reconstruction network, its anomaly map and the image score.

    score = max of the map, or the mean of its `top_k` largest pixels. With `standardize`, the
    score is taken from the map standardized per pixel by the mean and spread of the maps of
    held-out normal images (`set_normal_statistics`, fitted during validation), so places that
    are always hard to reconstruct (edges, prints) stop dominating the image score. The returned
    map stays the raw one.

    Args:
        net: (B, 3, H, W) in [0, 1] -> reconstruction (B, 3, H, W).
        anomaly_map: (image, reconstruction) -> map (B, H, W).
        top_k: image score = mean of the top-k map pixels instead of the maximum.
        standardize: score the standardized map once normal statistics are set.
    """

    def __init__(
        self,
        net: nn.Module,
        anomaly_map: AnomalyMap,
        top_k: int | None = None,
        standardize: bool = False,
    ) -> None:
        super().__init__()
        if top_k is not None and top_k < 1:
            raise ConfigError(f"top_k must be a positive number of pixels, got {top_k}")
        self.net, self.anomaly_map = net, anomaly_map
        self.top_k, self.standardize = top_k, standardize
        # Per-pixel statistics of normal maps (H, W); empty until set. Saved with the weights.
        self.register_buffer("normal_mean", torch.empty(0))
        self.register_buffer("normal_std", torch.empty(0))

    @property
    def has_normal_statistics(self) -> bool:
        return self.normal_mean.numel() > 0

    def set_normal_statistics(self, mean: Tensor, std: Tensor) -> None:
        """Store the per-pixel mean and spread (H, W) of normal maps (`NormalMapStatistics`)."""
        self.normal_mean, self.normal_std = mean, std

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The statistics' shape depends on the image size: take it from the checkpoint.
        for name in ("normal_mean", "normal_std"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def score(self, maps: Tensor) -> Tensor:
        """Image scores (B,) of anomaly maps (B, H, W)."""
        flat = maps.flatten(1)
        if self.standardize and self.has_normal_statistics:
            if self.normal_mean.shape != maps.shape[1:]:
                raise ConfigError(
                    f"normal statistics were fitted at {tuple(self.normal_mean.shape)} pixels but "
                    f"the maps are {tuple(maps.shape[1:])}; use the training image size"
                )
            flat = ((maps - self.normal_mean) / self.normal_std).flatten(1)
        if self.top_k is None:
            return flat.amax(dim=1)
        return flat.topk(min(self.top_k, flat.shape[1]), dim=1).values.mean(dim=1)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Detect anomalies in a batch.

        Args:
            images: (B, 3, H, W) in [0, 1].

        Returns:
            anomaly_map (B, H, W), score (B,) and reconstruction (B, 3, H, W).
        """
        reconstruction = self.net(images)
        maps = self.anomaly_map(images, reconstruction)
        return maps, self.score(maps), reconstruction


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
        maps = maps.detach().double()
        self.count = self.count + len(maps)
        self.total = self.total + maps.sum(0)
        self.total_sq = self.total_sq + maps.pow(2).sum(0)

    def compute(self) -> tuple[Tensor, Tensor]:
        """The per-pixel mean (H, W) and spread (H, W), float32.

        The spread is the standard deviation plus its own average (at least `MIN_SPREAD`), so
        nearly constant pixels cannot blow up a standardized score and it is never zero.

        Raises:
            ValueError: fewer than 2 maps were added.
        """
        if self.count < 2:
            raise ValueError(f"the spread needs at least 2 normal maps, got {int(self.count)}")
        mean = self.total / self.count
        std = (self.total_sq / self.count - mean**2).clamp(min=0).sqrt()
        # Every map alike (std 0 everywhere) still gives a finite, positive floor.
        floor = std.mean().clamp(min=MIN_SPREAD)
        return mean.float(), (std + floor).float()
