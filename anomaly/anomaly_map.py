"""The anomaly map: weighted per-pixel reconstruction errors, Gaussian-smoothed."""

from __future__ import annotations

import torch
from torch import Tensor

from anomaly.errors import ConfigError
from anomaly.similarity import WeightedErrorTerms, gaussian_filter, gaussian_kernel1d, is_number

# With sigma None, the smoothing is the image's shorter side over this: the same share of the
# object at every resolution (sigma 0.5 at 64 px, 1 at 128 px, 2 at 256 px). Chosen on validation
# at 128 px, where 1 pixel outlined the synthetic anomalies better than 2 (README, Results).
SIDE_PER_SIGMA = 128.0
# The rule of checkpoints written before the setting existed (sigma 2 at 128 px).
FORMER_SIDE_PER_SIGMA = 64.0


class AnomalyMap(WeightedErrorTerms):
    """Turns (image, reconstruction) into an anomaly map.

    map = l2 * squared error + l1 * absolute error + ssim * (1 - SSIM) / 2 + gradient * (1 - MSGMS),
    each averaged over channels (`anomaly.similarity.error_map`), then smoothed by a Gaussian of
    `sigma` pixels (0 switches it off; None follows the image: its shorter side /
    `side_per_sigma`, by default 128, so 0.5 pixel at 64 px, 1 at 128, 2 at 256). Every term
    lies in [0, 1], so a map lies in [0, l2 + l1 + ssim + gradient].

    The gradient term is the map of RIAD (Zavrtanik et al. 2021); DRAEM's ablation found the map
    function worth several AUROC points.

    Args:
        sigma: Gaussian smoothing in pixels, or None to follow the image size.
        side_per_sigma: with sigma None, the smoothing is the shorter side over this, > 0.
        **weights: `l2`, `l1`, `ssim`, `gradient` (`WeightedErrorTerms`).
    """

    def __init__(
        self,
        sigma: float | None = None,
        side_per_sigma: float = SIDE_PER_SIGMA,
        **weights: float,
    ) -> None:
        super().__init__(**weights)
        if sigma is not None and not (is_number(sigma) and sigma >= 0):
            raise ConfigError(f"anomaly map sigma must be >= 0 pixels or null, got {sigma!r}")
        if not (is_number(side_per_sigma) and side_per_sigma > 0):
            raise ConfigError(f"anomaly map side_per_sigma must be > 0, got {side_per_sigma!r}")
        self.sigma, self.side_per_sigma = sigma, side_per_sigma
        kernel = gaussian_kernel1d(sigma) if sigma else torch.ones(1)
        self.register_buffer("kernel", kernel, persistent=False)
        # sigma None: kernels by map size and device (`_kernel_for`).
        self._kernels: dict[tuple, Tensor] = {}

    def sigma_for(self, height: int, width: int) -> float:
        """The smoothing in pixels of (height, width) maps."""
        return self.sigma if self.sigma is not None else min(height, width) / self.side_per_sigma

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
        # In float32 under mixed precision too (`trainer.precision=bf16-mixed`): the errors of a
        # good reconstruction are smaller than bfloat16's steps.
        with torch.autocast(image.device.type, enabled=False):
            maps = torch.zeros_like(image[:, 0])  # (B, H, W)
            for _, weight, err in self.error_maps(reconstruction, image):
                maps = maps + weight * err
            if self.sigma is None:
                maps = gaussian_filter(maps.unsqueeze(1), self._kernel_for(maps)).squeeze(1)
            elif self.sigma > 0:
                maps = gaussian_filter(maps.unsqueeze(1), self.kernel).squeeze(1)
        return maps

    def _kernel_for(self, maps: Tensor) -> Tensor:
        """The kernel of sigma None for maps (B, H, W), made once per size and device (a copy to
        the GPU on every batch would make the host wait)."""
        key = (*maps.shape[1:], maps.device)
        if key not in self._kernels:
            self._kernels[key] = gaussian_kernel1d(self.sigma_for(*maps.shape[1:])).to(maps.device)
        return self._kernels[key]
