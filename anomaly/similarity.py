"""Per-pixel error maps between an image and its reconstruction, shared by loss and anomaly map.

The training loss (`anomaly.objective`) and the anomaly map (`anomaly.anomaly_map`) both weigh the
same error terms, computed here once; every term lies in [0, 1]:

- `l2`: squared error, averaged over channels.
- `l1`: absolute error, averaged over channels.
- `ssim`: structural dissimilarity (1 - SSIM) / 2, averaged over channels. SSIM: Wang, Bovik,
  Sheikh, Simoncelli, "Image quality assessment: from error visibility to structural
  similarity", IEEE TIP 13(4):600-612 (2004); Gaussian window, K1 = 0.01, K2 = 0.03.
- `gradient`: multi-scale gradient magnitude dissimilarity 1 - MSGMS. Gradient magnitude
  similarity (GMS): Xue, Zhang, Mou, Bovik, "Gradient magnitude similarity deviation", IEEE TIP
  23(2):684-695 (2014), with Prewitt filters and c = 170 / 255^2 = 0.0026 for images in [0, 1];
  its multi-scale map is the anomaly map of RIAD (Zavrtanik, Kristan, Skocaj, "Reconstruction by
  inpainting for visual anomaly detection", Pattern Recognition 112:107706, 2021), also compared
  in DRAEM (Zavrtanik et al., ICCV 2021).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from anomaly.errors import ConfigError

ERROR_TERMS = ("l2", "l1", "ssim", "gradient")
# ITU-R BT.601 luma weights, the usual RGB -> grayscale conversion.
_LUMA = (0.299, 0.587, 0.114)


def check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    """Raise ValueError unless x and y are (B, C, H, W) tensors of one shape."""
    if x.ndim != 4 or x.shape != y.shape:
        raise ValueError(
            f"expected two tensors of the same shape (B, C, H, W), got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )


def gaussian_kernel1d(
    sigma: float, radius: int | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Normalized 1-D Gaussian of (2 * radius + 1,) taps.

    Args:
        sigma: standard deviation in pixels, > 0.
        radius: half-width in taps; by default 4 sigma (as scipy.ndimage truncates), at least 1.
        dtype: the kernel's dtype (computed in it, so float64 inputs keep their precision).
    """
    if radius is None:
        radius = max(1, int(math.ceil(4.0 * sigma)))
    coords = torch.arange(-radius, radius + 1, dtype=dtype)
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def gaussian_filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Filter each channel of x (B, C, H, W) by the outer product of the 1-D ``kernel`` (K,).

    Borders are reflected, so the output keeps (B, C, H, W) without darkening them as zero
    padding would. On images narrower than the kernel, the kernel is cut to what reflection can
    reach (size - 1 pixels each side).
    """
    channels, radius = x.shape[1], kernel.numel() // 2
    pad_h, pad_w = min(radius, x.shape[-2] - 1), min(radius, x.shape[-1] - 1)
    x = F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
    row = kernel[radius - pad_w : radius + pad_w + 1].to(x)
    column = kernel[radius - pad_h : radius + pad_h + 1].to(x)
    x = F.conv2d(x, row.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, column.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


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
    check_pair(x, y)
    if window_size < 1 or window_size % 2 == 0 or sigma <= 0 or data_range <= 0:
        raise ValueError(
            "window_size must be odd and positive, sigma and data_range positive, got "
            f"{window_size}, {sigma}, {data_range}"
        )
    if min(x.shape[2:]) <= window_size // 2:
        raise ValueError(
            f"image size {x.shape[2]}x{x.shape[3]} is too small for an SSIM window of {window_size}"
        )
    kernel = gaussian_kernel1d(sigma, window_size // 2, x.dtype).to(x.device)
    channels = x.shape[1]
    # Wang et al.'s two factors rewritten without cancellation (equal in exact arithmetic):
    # 2 mu_x mu_y = mu_x^2 + mu_y^2 - mu_d^2 and 2 cov = var_x + var_y - var_d, with d = x - y,
    # whose moments are small, so float32 keeps their digits. The images are centred on half
    # the data range, which shrinks the moments var_x + var_y is the difference of.
    half = data_range / 2
    x_c, y_c, d = x - half, y - half, x - y
    moments = gaussian_filter(torch.cat([x_c, y_c, x_c * x_c + y_c * y_c, d * d], dim=1), kernel)
    mu_xc, mu_yc, squares, d_squares = moments.split(channels, dim=1)  # each (B, C, H, W)
    mu_d = mu_xc - mu_yc
    mu_x, mu_y = mu_xc + half, mu_yc + half
    var_sum = squares - mu_xc * mu_xc - mu_yc * mu_yc  # var_x + var_y
    var_d = d_squares - mu_d * mu_d
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    luminance = 1 - mu_d * mu_d / (mu_x * mu_x + mu_y * mu_y + c1)
    return luminance * (1 - var_d / (var_sum + c2))


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
    check_pair(x, y)
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


def error_map(term: str, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The per-pixel error of one term (see the module docstring), (B, H, W) in [0, 1].

    Args:
        term: one of ERROR_TERMS.
        prediction: reconstructions (B, C, H, W).
        target: images (B, C, H, W); `gradient` needs H, W >= 8 (its coarsest scale).
    """
    if term == "l2":
        return (prediction - target).pow(2).mean(dim=1)
    if term == "l1":
        return (prediction - target).abs().mean(dim=1)
    if term == "ssim":
        return (1 - ssim_map(prediction, target).mean(dim=1)) / 2
    if term == "gradient":
        return msgms_map(prediction, target).squeeze(1)
    raise ValueError(f"unknown error term {term!r}; expected one of {ERROR_TERMS}")


def is_number(value) -> bool:
    """An int or float setting (not a bool, a string or None)."""
    return not isinstance(value, bool) and isinstance(value, (int, float))


class WeightedErrorTerms(nn.Module):
    """The weights of the error terms that a loss or an anomaly map combines.

    Args:
        l2, l1, ssim, gradient: weight of each term of ERROR_TERMS; all >= 0, one > 0.

    Raises:
        ConfigError: a negative or NaN weight, or all weights zero.
    """

    def __init__(
        self, l2: float = 1.0, l1: float = 0.0, ssim: float = 0.0, gradient: float = 0.0
    ) -> None:
        super().__init__()
        weights = {"l2": l2, "l1": l1, "ssim": ssim, "gradient": gradient}
        for name, weight in weights.items():
            if not (is_number(weight) and weight >= 0):  # also rejects NaN
                raise ConfigError(f"weight {name} must be >= 0, got {weight!r}")
        self.weights = {name: float(weight) for name, weight in weights.items() if weight > 0}
        if not self.weights:
            raise ConfigError(f"at least one of the weights {ERROR_TERMS} must be > 0")

    def error_maps(self, prediction: torch.Tensor, target: torch.Tensor):
        """Yield (term, weight, error map (B, H, W)) for every term with a nonzero weight."""
        for term, weight in self.weights.items():
            yield term, weight, error_map(term, prediction, target)
