"""Image similarity maps and the reconstruction loss.

- SSIM: Wang, Bovik, Sheikh, Simoncelli, "Image quality assessment: from error visibility to
  structural similarity", IEEE TIP 13(4):600-612 (2004); Gaussian window, K1 = 0.01, K2 = 0.03.
- Gradient magnitude similarity (GMS): Xue, Zhang, Mou, Bovik, "Gradient magnitude similarity
  deviation", IEEE TIP 23(2):684-695 (2014), with Prewitt filters and c = 170 / 255^2 = 0.0026
  for images in [0, 1]. Its multi-scale dissimilarity map 1 - MSGMS is the anomaly map of RIAD
  (Zavrtanik, Kristan, Skocaj, "Reconstruction by inpainting for visual anomaly detection",
  Pattern Recognition 112:107706, 2021), also compared in DRAEM (Zavrtanik et al., ICCV 2021).
"""

import torch
import torch.nn.functional as F
from torch import nn

# ITU-R BT.601 luma weights, the usual RGB -> grayscale conversion.
_LUMA = (0.299, 0.587, 0.114)


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape != y.shape:
        raise ValueError(
            f"expected two tensors of the same shape (B, C, H, W), got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )


def _depthwise_separable(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Filter each channel of x (B, C, H, W) by the outer product of the 1D ``kernel`` (K,).

    Reflect padding keeps (B, C, H, W) without darkening the borders as zero padding would.
    """
    channels, size = x.shape[1], kernel.numel()
    pad = size // 2
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)


def ssim_map(
    x: torch.Tensor,
    y: torch.Tensor,
    window_size: int = 11,
    sigma: float = 1.5,
    data_range: float = 1.0,
) -> torch.Tensor:
    """Per-pixel, per-channel SSIM (Wang et al. 2004) with a Gaussian window.

    Local statistics use reflect padding, so the map has the input size; 1 means identical.

    Args:
        x: Images (B, C, H, W).
        y: Images (B, C, H, W).
        window_size: Odd side of the Gaussian window; H and W must exceed window_size // 2.
        sigma: Standard deviation of the Gaussian window, in pixels.
        data_range: Value range of the images (1 for [0, 1]); sets the stabilizing constants.

    Returns:
        SSIM map (B, C, H, W), at most 1.
    """
    _check_pair(x, y)
    if window_size < 1 or window_size % 2 == 0 or sigma <= 0 or data_range <= 0:
        raise ValueError(
            "window_size must be odd and positive, sigma and data_range positive, got "
            f"{window_size}, {sigma}, {data_range}"
        )
    if min(x.shape[2:]) <= window_size // 2:
        raise ValueError(
            f"image size {x.shape[2]}x{x.shape[3]} is too small for an SSIM window of {window_size}"
        )
    coords = torch.arange(window_size, dtype=x.dtype, device=x.device) - (window_size - 1) / 2
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()

    channels = x.shape[1]
    # One filtering pass over all five local moments.
    moments = _depthwise_separable(torch.cat([x, y, x * x, y * y, x * y], dim=1), kernel)
    mu_x, mu_y, xx, yy, xy = moments.split(channels, dim=1)  # each (B, C, H, W)
    var_x = xx - mu_x * mu_x
    var_y = yy - mu_y * mu_y
    cov = xy - mu_x * mu_y
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    luminance = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    return luminance * (2 * cov + c2) / (var_x + var_y + c2)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W): BT.601 luma for C = 3, the channel mean otherwise."""
    if x.shape[1] == 3:
        weights = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * weights).sum(dim=1, keepdim=True)
    return x.mean(dim=1, keepdim=True)


def _gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Prewitt gradient magnitude of x (B, 1, H, W), same shape (Xue et al. 2014)."""
    prewitt = torch.tensor([[1.0, 0.0, -1.0]] * 3, dtype=x.dtype, device=x.device) / 3
    kernels = torch.stack([prewitt, prewitt.T]).unsqueeze(1)  # (2, 1, 3, 3): horizontal, vertical
    # Replicate padding works down to 1x1 images, which the coarsest scale may produce.
    grad = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernels)  # (B, 2, H, W)
    # The epsilon keeps the backward pass finite where the image is flat.
    return torch.sqrt((grad * grad).sum(dim=1, keepdim=True) + 1e-12)


def msgms_map(
    x: torch.Tensor,
    y: torch.Tensor,
    scales: tuple[int, ...] = (1, 2, 4, 8),
    c: float = 0.0026,
) -> torch.Tensor:
    """Multi-scale gradient magnitude dissimilarity 1 - MSGMS (RIAD, Zavrtanik et al. 2021).

    Both images are turned to grayscale; for each scale s they are average-pooled by s, their
    Prewitt gradient magnitudes m_x, m_y give GMS = (2 m_x m_y + c) / (m_x^2 + m_y^2 + c), and
    1 - GMS is upsampled bilinearly back to H, W. The maps are averaged over scales.

    Args:
        x: Images (B, C, H, W), values in [0, 1] for the default ``c``.
        y: Images (B, C, H, W).
        scales: Pooling factors; each must be >= 1 and at most min(H, W).
        c: Stabilizing constant of GMS.

    Returns:
        Dissimilarity map (B, 1, H, W) in [0, 1); 0 where the gradients agree.
    """
    _check_pair(x, y)
    scales = tuple(int(s) for s in scales)
    if not scales or min(scales) < 1 or c <= 0:
        raise ValueError(f"scales must be non-empty ints >= 1 and c > 0, got {scales}, {c}")
    height, width = x.shape[2:]
    if max(scales) > min(height, width):
        raise ValueError(f"image size {height}x{width} is too small for scale {max(scales)}")
    gray_x, gray_y = _grayscale(x), _grayscale(y)
    total = torch.zeros_like(gray_x)
    for s in scales:
        gx, gy = gray_x, gray_y
        if s > 1:
            gx, gy = F.avg_pool2d(gx, s), F.avg_pool2d(gy, s)  # (B, 1, H // s, W // s)
        mag_x, mag_y = _gradient_magnitude(gx), _gradient_magnitude(gy)
        dissimilarity = 1 - (2 * mag_x * mag_y + c) / (mag_x * mag_x + mag_y * mag_y + c)
        if s > 1:
            dissimilarity = F.interpolate(
                dissimilarity, size=(height, width), mode="bilinear", align_corners=False
            )
        total = total + dissimilarity
    return total / len(scales)


class ReconstructionLoss(nn.Module):
    """Weighted sum of per-pixel reconstruction errors, with corrupted pixels weighed apart.

    Every error map ``err`` is (B, 1, H, W): l2 = squared error and l1 = absolute error, both
    averaged over channels; ssim = 1 - ssim_map averaged over channels; gradient = msgms_map
    (so images need H, W >= 8 with its default scales). Each term is
    ``mean(err * (1 - m)) + corrupted_weight * mean(err * m)``, both means over all B * H * W
    pixels, with m the corruption mask (m = 0 without a mask); corrupted_weight = 1 gives the
    plain mean.

    Args:
        l2: Weight of the squared error.
        l1: Weight of the absolute error.
        ssim: Weight of 1 - SSIM.
        gradient: Weight of the multi-scale gradient magnitude dissimilarity.
        corrupted_weight: Factor on the corrupted region's share of every term.
    """

    def __init__(
        self,
        l2: float = 1.0,
        l1: float = 0.0,
        ssim: float = 0.0,
        gradient: float = 0.0,
        corrupted_weight: float = 1.0,
    ) -> None:
        super().__init__()
        weights = {"l2": l2, "l1": l1, "ssim": ssim, "gradient": gradient}
        for name, weight in {**weights, "corrupted_weight": corrupted_weight}.items():
            if not weight >= 0:  # also rejects NaN
                raise ValueError(f"loss weight {name} must be >= 0, got {weight}")
        self.weights = {name: float(w) for name, w in weights.items() if w > 0}
        if not self.weights:
            raise ValueError("at least one of the weights l2, l1, ssim, gradient must be > 0")
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
        _check_pair(pred, target)
        if mask is not None:
            expected = (pred.shape[0], 1, *pred.shape[2:])
            if tuple(mask.shape) != expected:
                raise ValueError(f"expected mask of shape {expected}, got {tuple(mask.shape)}")
            mask = mask.to(pred.dtype)
        terms = {}
        for name in self.weights:
            err = self._error_map(name, pred, target)  # (B, 1, H, W)
            if mask is None:
                terms[name] = err.mean()
            else:
                terms[name] = (err * (1 - mask)).mean() + self.corrupted_weight * (
                    err * mask
                ).mean()
        total = sum(weight * terms[name] for name, weight in self.weights.items())
        return total, terms

    @staticmethod
    def _error_map(name: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-pixel error (B, 1, H, W) of one term."""
        if name == "l2":
            return (pred - target).pow(2).mean(dim=1, keepdim=True)
        if name == "l1":
            return (pred - target).abs().mean(dim=1, keepdim=True)
        if name == "ssim":
            return 1 - ssim_map(pred, target).mean(dim=1, keepdim=True)
        return msgms_map(pred, target)
