"""The training objective both models share: turn the network's input back into the clean image.

- **Reconstruction** (Model I): the input is the clean normal image itself.
- **Restoration** (Model II, Bauer et al. 2024): the input is the clean image corrupted on the fly
  inside a random region (`anomaly.data.corruptions`: DTD or procedural textures, elastic
  warps), and the corrupted pixels weigh more in the loss, so the network learns to replace what
  does not look normal instead of copying it.

Which one a model trains with is set by its config, `model.objective.corruption.prob` (0 for
reconstruction); the loss below serves both.
"""

import torch

from anomaly.errors import ConfigError
from anomaly.similarity import WeightedErrorTerms, check_pair


class ReconstructionLoss(WeightedErrorTerms):
    """Weighted sum of per-pixel error terms, with corrupted pixels weighed apart.

    Every term's error map ``err`` (B, H, W) comes from `anomaly.similarity.error_map` (l2, l1,
    ssim = (1 - SSIM) / 2, gradient = 1 - MSGMS, which needs H, W >= 8). Each term is
    ``mean(err * (1 - m)) + corrupted_weight * mean(err * m)``, both means over all B * H * W
    pixels, with m the corruption mask (m = 0 without a mask); corrupted_weight = 1 gives the
    plain mean.

    Args:
        corrupted_weight: Factor on the corrupted region's share of every term.
        **weights: `l2`, `l1`, `ssim`, `gradient` (`WeightedErrorTerms`); ssim = 2 gives the
            usual 1 - SSIM loss.
    """

    def __init__(self, corrupted_weight: float = 1.0, **weights: float) -> None:
        super().__init__(**weights)
        if not corrupted_weight >= 0:  # also rejects NaN
            raise ConfigError(f"corrupted_weight must be >= 0, got {corrupted_weight}")
        self.corrupted_weight = float(corrupted_weight)

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute the loss.

        Args:
            pred: Reconstructions (B, C, H, W).
            target: Clean images (B, C, H, W).
            mask: Corrupted pixels (B, 1, H, W), 1 inside the corruption, or None.

        Returns:
            The scalar total (sum of weight * term) and the unweighted scalar terms, keyed
            "l2", "l1", "ssim", "gradient" for the nonzero weights only.
        """
        check_pair(pred, target)
        if mask is not None:
            expected = (pred.shape[0], 1, *pred.shape[2:])
            if tuple(mask.shape) != expected:
                raise ValueError(f"expected mask of shape {expected}, got {tuple(mask.shape)}")
        # In float32 under mixed precision too, as the anomaly map (anomaly_map.py); a float64
        # pair keeps its precision.
        dtype = torch.promote_types(pred.dtype, torch.float32)
        pred, target = pred.to(dtype), target.to(dtype)
        if mask is not None:
            mask = mask.to(dtype).squeeze(1)  # (B, H, W)
        terms = {}
        with torch.autocast(pred.device.type, enabled=False):
            for name, _, err in self.error_maps(pred, target):  # err (B, H, W)
                if mask is None:
                    terms[name] = err.mean()
                else:
                    inside = (err * mask).mean()
                    terms[name] = (err * (1 - mask)).mean() + self.corrupted_weight * inside
            total = sum(weight * terms[name] for name, weight in self.weights.items())
        return total, terms
