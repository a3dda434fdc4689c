"""Anomaly map and image score from a reconstruction: the project's single inference path.

Validation, test, prediction and export all call `AnomalyScorer`, so they cannot disagree.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomaly.models.losses import msgms_map, ssim_map


def gaussian_kernel1d(sigma: float) -> Tensor:
    """Normalized 1-D Gaussian, truncated at 4 sigma (as scipy.ndimage does). Shape (K,)."""
    radius = max(1, int(math.ceil(4.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: Tensor, kernel: Tensor) -> Tensor:
    """Separable Gaussian smoothing with reflected borders. maps (B, H, W) -> (B, H, W)."""
    radius = kernel.numel() // 2
    x = maps.unsqueeze(1)  # (B, 1, H, W)
    pad_h = min(radius, x.shape[-2] - 1)
    pad_w = min(radius, x.shape[-1] - 1)
    x = F.pad(x, (pad_w, pad_w, 0, 0), mode="reflect") if pad_w else x
    x = F.conv2d(x, kernel[radius - pad_w : radius + pad_w + 1].view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, pad_h, pad_h), mode="reflect") if pad_h else x
    x = F.conv2d(x, kernel[radius - pad_h : radius + pad_h + 1].view(1, 1, -1, 1))
    return x.squeeze(1)


class AnomalyScorer(nn.Module):
    """Turns (image, reconstruction) into an anomaly map and an image score.

    map = l2_weight * mean_c (x - x_hat)^2 + ssim_weight * mean_c (1 - SSIM) / 2
          + gms_weight * (1 - MSGMS), smoothed by a Gaussian of `sigma` pixels (0 switches it off).
    score = max of the smoothed map, or the mean of its `top_k` largest pixels when top_k is set.
    Every term lies in [0, 1], so a map lies in [0, l2_weight + ssim_weight + gms_weight].

    With `standardize_score`, the score is taken from the map standardized per pixel by the
    mean and spread of the maps of held-out normal images (`fit_normal_statistics`), so places
    that are always hard to reconstruct (edges, prints) stop dominating the image score. The
    returned map stays the raw one.

    Args:
        l2_weight: weight of the squared error averaged over channels.
        ssim_weight: weight of the structural dissimilarity (Wang et al. 2004).
        gms_weight: weight of the multi-scale gradient magnitude dissimilarity (Zavrtanik et al.,
            RIAD 2021; DRAEM's ablation found the map function worth several AUROC points).
        sigma: Gaussian smoothing in pixels (4 by default).
        top_k: image score = mean of the top-k map pixels instead of the maximum.
        standardize_score: score the map standardized by normal-image statistics once fitted.
    """

    def __init__(
        self,
        l2_weight: float = 1.0,
        ssim_weight: float = 0.0,
        gms_weight: float = 0.0,
        sigma: float = 4.0,
        top_k: int | None = None,
        standardize_score: bool = False,
    ) -> None:
        super().__init__()
        weights = {"l2_weight": l2_weight, "ssim_weight": ssim_weight, "gms_weight": gms_weight}
        if any(w < 0 for w in weights.values()) or sum(weights.values()) == 0:
            raise ValueError(f"anomaly map weights must be >= 0 and not all zero, got {weights}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be a positive number of pixels, got {top_k}")
        self.l2_weight, self.ssim_weight, self.gms_weight = l2_weight, ssim_weight, gms_weight
        self.sigma, self.top_k, self.standardize_score = sigma, top_k, standardize_score
        kernel = gaussian_kernel1d(sigma) if sigma > 0 else torch.ones(1)
        self.register_buffer("kernel", kernel, persistent=False)
        # Per-pixel statistics of normal maps (H, W); empty until fitted. Saved in checkpoints.
        self.register_buffer("normal_mean", torch.empty(0))
        self.register_buffer("normal_std", torch.empty(0))

    @property
    def has_normal_statistics(self) -> bool:
        return self.normal_mean.numel() > 0

    def fit_normal_statistics(self, count: Tensor, total: Tensor, total_sq: Tensor) -> None:
        """Store the per-pixel mean and spread of normal maps from their running sums.

        Args:
            count: number of normal maps (0-dim).
            total, total_sq: (H, W) sums of the maps and of their squares.
        """
        mean = total / count
        std = (total_sq / count - mean**2).clamp(min=0).sqrt()
        # The spread is floored by its average so nearly constant pixels cannot blow up.
        self.normal_mean, self.normal_std = mean, std + std.mean()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The statistics' shape depends on the image size: take it from the checkpoint.
        for name in ("normal_mean", "normal_std"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def max_value(self) -> float:
        """Upper bound of any map value (used to bin pixel scores for bounded-memory metrics)."""
        return self.l2_weight + self.ssim_weight + self.gms_weight

    def forward(self, image: Tensor, reconstruction: Tensor) -> tuple[Tensor, Tensor]:
        """Score a batch.

        Args:
            image: (B, C, H, W) input image in [0, 1].
            reconstruction: (B, C, H, W) the network's output.

        Returns:
            anomaly_map (B, H, W) and score (B,).
        """
        image, reconstruction = image.float(), reconstruction.float()
        maps = torch.zeros_like(image[:, 0])  # (B, H, W)
        if self.l2_weight:
            maps = maps + self.l2_weight * (image - reconstruction).pow(2).mean(dim=1)
        if self.ssim_weight:
            dissimilarity = (1.0 - ssim_map(image, reconstruction)).mean(dim=1) / 2.0
            maps = maps + self.ssim_weight * dissimilarity
        if self.gms_weight:
            maps = maps + self.gms_weight * msgms_map(image, reconstruction).squeeze(1)
        if self.sigma > 0:
            maps = gaussian_blur(maps, self.kernel)
        flat = maps.flatten(1)
        if self.standardize_score and self.has_normal_statistics:
            if self.normal_mean.shape != maps.shape[1:]:
                raise ValueError(
                    f"normal statistics were fitted at {tuple(self.normal_mean.shape)} pixels but "
                    f"the maps are {tuple(maps.shape[1:])}; use the training image size"
                )
            flat = ((maps - self.normal_mean) / self.normal_std).flatten(1)
        if self.top_k is None:
            scores = flat.amax(dim=1)
        else:
            scores = flat.topk(min(self.top_k, flat.shape[1]), dim=1).values.mean(dim=1)
        return maps, scores
