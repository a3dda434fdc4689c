"""Model I: residual convolutional autoencoder.

The layout follows Luo et al., "Unsupervised anomaly detection in brain MRI: learning abstract
distribution from massive healthy brains", Comput. Biol. Med. 154:106610 (2023): an encoder of
residual downsampling blocks, a narrow bottleneck and a mirrored decoder of residual upsampling
blocks. The residual block is the basic block of He et al., "Deep residual learning for image
recognition", CVPR 2016, with a 1x1 projection shortcut.

Our choices, not taken from the paper: the widths, the normalization options, LeakyReLU(0.2)
activations (they never give an exactly zero gradient, which keeps small models trainable), the
1x1-conv spatial latent and the optional fully connected latent, and a sigmoid output in [0, 1].

Shared blocks (norm, conv block, input checks) live in ``anomaly.models.blocks``.
"""

from collections.abc import Sequence

import torch
from torch import nn

from anomaly.errors import ConfigError
from anomaly.models import blocks


class ResidualBlock(nn.Module):
    """Two 3x3 conv + norm layers with a strided 1x1 projection shortcut (He et al. 2016).

    Maps (B, in_channels, H, W) to (B, out_channels, H / stride, W / stride).
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            blocks.conv_norm_act(in_channels, out_channels, norm, stride=stride),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=norm == "none"),
            blocks.make_norm(norm, out_channels),
        )
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
        self.act = nn.LeakyReLU(blocks.NEGATIVE_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class UpBlock(nn.Module):
    """Upsample x2, then a stride-1 residual block (its 1x1 shortcut sees the upsampled input).

    Maps (B, in_channels, H, W) to (B, out_channels, 2H, 2W).
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str, mode: str) -> None:
        super().__init__()
        align = False if mode == "bilinear" else None
        self.up = nn.Upsample(scale_factor=2, mode=mode, align_corners=align)
        self.block = ResidualBlock(in_channels, out_channels, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.up(x))


class ResidualAutoencoder(nn.Module):
    """Residual convolutional autoencoder (Model I, after Luo et al. 2023).

    With n = len(channels), the encoder is a stem conv at full resolution and n residual blocks
    that each halve H and W; the bottleneck is either a spatial latent (1x1 conv down to
    ``latent_channels`` and back) or, when ``latent_dim`` is set, a latent vector
    (flatten -> Linear -> Linear -> reshape); the decoder mirrors the encoder and ends in a 3x3
    conv and a sigmoid.

    Args:
        in_channels: Image channels; the output has the same number.
        channels: Width after each downsampling block. The default keeps a 128 px batch of 16 at
            about 0.45 s per training step on 2 CPU cores; (32, 64, 128, 256) takes about 1.1 s.
        latent_channels: Width of the spatial latent; ignored when ``latent_dim`` is set.
        latent_dim: Size of the fully connected latent vector, or None for a spatial latent.
        image_size: Input size H (square) or (H, W); required with ``latent_dim`` because the
            linear layers depend on it, optional (only checked) otherwise.
        norm: "batch", "instance", "group" or "none".
        upsample: "nearest" or "bilinear" upsampling in the decoder.
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: Sequence[int] = (16, 32, 64, 128),
        latent_channels: int = 64,
        latent_dim: int | None = None,
        image_size: int | Sequence[int] | None = None,
        norm: str = "batch",
        upsample: str = "nearest",
    ) -> None:
        super().__init__()
        channels = blocks.check_widths(in_channels, channels)
        blocks.check_norm(norm)
        if latent_channels < 1:
            raise ConfigError(f"latent_channels must be >= 1, got {latent_channels}")
        if upsample not in blocks.UPSAMPLE_MODES:
            raise ConfigError(
                f"unknown upsample {upsample!r}; expected one of {blocks.UPSAMPLE_MODES}"
            )
        if latent_dim is not None and latent_dim < 1:
            raise ConfigError(f"latent_dim must be >= 1 or None, got {latent_dim}")
        if latent_dim is not None and image_size is None:
            raise ConfigError("latent_dim needs image_size: the linear latent layers depend on it")
        self.in_channels = in_channels
        self.num_blocks = len(channels)
        # H and W must be multiples of this (every encoder block halves them).
        self.stride = 2**self.num_blocks
        self.image_size = None if image_size is None else blocks.as_pair(image_size)
        if self.image_size is not None:
            blocks.check_divisible(*self.image_size, self.num_blocks)

        widths = (channels[0], *channels)  # the stem keeps the first width
        self.stem = blocks.conv_norm_act(in_channels, channels[0], norm)
        self.encoder = nn.Sequential(
            *(ResidualBlock(widths[i], widths[i + 1], norm, stride=2) for i in range(len(channels)))
        )
        deepest = channels[-1]
        if latent_dim is None:
            self.bottleneck = nn.Sequential(
                # A linear projection: the latent code itself has no activation.
                nn.Conv2d(deepest, latent_channels, 1),
                blocks.conv_norm_act(latent_channels, deepest, norm, kernel_size=1),
            )
        else:
            h, w = (s // 2**self.num_blocks for s in self.image_size)
            flat = deepest * h * w
            self.bottleneck = nn.Sequential(
                nn.Flatten(),
                nn.Linear(flat, latent_dim),
                nn.Linear(latent_dim, flat),
                nn.Unflatten(1, (deepest, h, w)),
                nn.LeakyReLU(blocks.NEGATIVE_SLOPE),
            )
        self.decoder = nn.Sequential(
            *(
                UpBlock(widths[i + 1], widths[i], norm, upsample)
                for i in reversed(range(len(channels)))
            )
        )
        self.head = nn.Sequential(nn.Conv2d(channels[0], in_channels, 3, padding=1), nn.Sigmoid())
        self.fully_connected = latent_dim is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruct a batch of images.

        Args:
            x: Images (B, in_channels, H, W), H and W divisible by 2 ** len(channels) (and equal
                to ``image_size`` with a fully connected latent).

        Returns:
            Reconstructions (B, in_channels, H, W) in [0, 1].
        """
        blocks.check_image_batch(x, self.in_channels)
        blocks.check_divisible(x.shape[2], x.shape[3], self.num_blocks)
        if self.fully_connected and tuple(x.shape[2:]) != self.image_size:
            raise ValueError(
                f"this model has a fully connected latent for image size {self.image_size}, "
                f"got {tuple(x.shape[2:])}"
            )
        z = self.encoder(self.stem(x))  # (B, C_n, H / 2^n, W / 2^n)
        z = self.bottleneck(z)  # (B, C_n, H / 2^n, W / 2^n)
        return self.head(self.decoder(z))  # (B, in_channels, H, W)
