"""The anomaly map: weighted per-pixel reconstruction errors, Gaussian-smoothed."""

from __future__ import annotations

import torch
from torch import Tensor

from anomaly.errors import ConfigError
from anomaly.similarity import WeightedErrorTerms, gaussian_filter, gaussian_kernel1d


class AnomalyMap(WeightedErrorTerms):
    """Turns (image, reconstruction) into an anomaly map.

    map = l2 * squared error + l1 * absolute error + ssim * (1 - SSIM) / 2 + gradient * (1 - MSGMS),
    each averaged over channels (`anomaly.similarity.error_map`), then smoothed by a Gaussian of
    `sigma` pixels (0 switches it off). Every term lies in [0, 1], so a map lies in
    [0, l2 + l1 + ssim + gradient].

    The gradient term is the map of RIAD (Zavrtanik et al. 2021); DRAEM's ablation found the map
    function worth several AUROC points.

    Args:
        sigma: Gaussian smoothing in pixels.
        **weights: `l2`, `l1`, `ssim`, `gradient` (`WeightedErrorTerms`).
    """

    def __init__(self, sigma: float = 4.0, **weights: float) -> None:
        super().__init__(**weights)
        if not sigma >= 0:
            raise ConfigError(f"anomaly map sigma must be >= 0 pixels, got {sigma}")
        self.sigma = sigma
        kernel = gaussian_kernel1d(sigma) if sigma > 0 else torch.ones(1)
        self.register_buffer("kernel", kernel, persistent=False)

    @property
    def max_value(self) -> float:
        """Upper bound of any map value (used to bin pixel scores for bounded-memory metrics)."""
        return sum(self.weights.values())

    def forward(self, image: Tensor, reconstruction: Tensor) -> Tensor:
        """Map a batch.

        Args:
            image: (B, C, H, W) input image in [0, 1].
            reconstruction: (B, C, H, W) the network's output.

        Returns:
            anomaly map (B, H, W).
        """
        image, reconstruction = image.float(), reconstruction.float()
        maps = torch.zeros_like(image[:, 0])  # (B, H, W)
        for _, weight, err in self.error_maps(reconstruction, image):
            maps = maps + weight * err
        if self.sigma > 0:
            maps = gaussian_filter(maps.unsqueeze(1), self.kernel).squeeze(1)
        return maps
