"""Building blocks shared by both networks: normalization, conv-norm-activation, input checks."""

import math
from collections.abc import Sequence

import torch
from torch import nn

from anomaly.errors import ConfigError

NORMS = ("batch", "instance", "group", "none")
UPSAMPLE_MODES = ("nearest", "bilinear")
# LeakyReLU slope: never an exactly zero gradient, which keeps small models trainable.
NEGATIVE_SLOPE = 0.2


def make_norm(kind: str, channels: int) -> nn.Module:
    """Build a 2D normalization layer.

    Args:
        kind: "batch", "instance" (with affine parameters), "group" (gcd(8, channels) groups, so
            the group count always divides the width) or "none".
        channels: Number of feature channels C of the (B, C, H, W) input.

    Returns:
        The layer; it keeps the input shape.
    """
    check_norm(kind)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    return nn.Identity()


def conv_norm_act(
    in_channels: int,
    out_channels: int,
    norm: str,
    kernel_size: int = 3,
    stride: int = 1,
    dilation: int = 1,
) -> nn.Sequential:
    """Convolution, normalization, LeakyReLU; "same" padding, so only ``stride`` changes H, W.

    Maps (B, in_channels, H, W) to (B, out_channels, H / stride, W / stride).
    """
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        # A bias is redundant right before a normalization that subtracts the mean.
        nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, bias=norm == "none"
        ),
        make_norm(norm, out_channels),
        nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True),
    )


def check_divisible(height: int, width: int, num_blocks: int) -> None:
    """Raise ConfigError unless H and W survive ``num_blocks`` halvings without rounding."""
    factor = 2**num_blocks
    if height % factor or width % factor:
        raise ConfigError(
            f"image size {height}x{width} is not divisible by {factor} "
            f"({num_blocks} downsampling blocks)"
        )


def check_image_batch(x: torch.Tensor, in_channels: int) -> None:
    """Raise ValueError unless ``x`` has shape (B, in_channels, H, W)."""
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(f"expected input of shape (B, {in_channels}, H, W), got {tuple(x.shape)}")


def check_widths(in_channels: int, channels: Sequence[int]) -> tuple[int, ...]:
    """The widths as ints; ConfigError unless in_channels and every width are >= 1."""
    widths = tuple(int(c) for c in channels)
    if not widths or min(widths) < 1 or in_channels < 1:
        raise ConfigError(
            "in_channels and every entry of a non-empty channels must be >= 1, "
            f"got {in_channels}, {widths}"
        )
    return widths


def check_norm(norm: str) -> None:
    """ConfigError unless ``norm`` is one of NORMS."""
    if norm not in NORMS:
        raise ConfigError(f"unknown norm {norm!r}; expected one of {NORMS}")


def as_pair(size: int | Sequence[int]) -> tuple[int, int]:
    """Turn H or (H, W) into (H, W)."""
    if isinstance(size, int):
        return size, size
    pair = tuple(int(s) for s in size)
    if len(pair) != 2:
        raise ConfigError(f"image size must be an int or (H, W), got {size}")
    return pair
