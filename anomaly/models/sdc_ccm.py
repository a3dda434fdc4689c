"""Model II: U-Net-style autoencoder with SDC blocks and convex combination skips (SDC-CCM).

After Bauer, Nakajima and Müller, "Self-supervised training with autoencoders for visual anomaly
detection", arXiv:2206.11723; journal version "Self-Supervised Autoencoders for Visual Anomaly
Detection", Mathematics 12(24):3988 (2024).

From the paper: an encoder-decoder with skip connections between equal resolutions; a
bottleneck of stacked dilated convolution (SDC) blocks, i.e. parallel dilated 3x3 convolutions
whose outputs are concatenated and fused (the SDC idea is from Schuster et al., "SDC - Stacked
Dilated Convolution: A Unified Descriptor Network for Dense Matching Tasks", CVPR 2019), so the
lowest resolution sees a wide context; and skip connections that merge encoder and decoder
features by a learned convex combination (CCM) instead of concatenation.

Our choices (not checked against the authors' code): the widths, the default dilation rates
(1, 2, 4, 8, 16, 32) and block count; stem + (strided conv, 3x3 conv) encoder stages; each SDC
branch has C // len(dilations) channels, so one block costs about one 3x3 C -> C conv; a residual
connection around each SDC block; decoder stages of 3x3 conv, nearest upsampling, merge, 3x3
conv; a 1x1 conv for the CCM coefficient (d already carries the bottleneck's wide context);
LeakyReLU(0.2); a sigmoid output in [0, 1]. The ablations (``skip="concat"`` or ``"none"``,
``sdc=False``) are ours too.
"""

from collections.abc import Sequence

import torch
from torch import nn

from anomaly.errors import ConfigError
from anomaly.models import blocks

SKIPS = ("ccm", "concat", "none")


class SDCBlock(nn.Module):
    """Stacked dilated convolution block with a residual connection.

    Parallel 3x3 convolutions with dilation rates ``dilations`` (padding = dilation, so H, W are
    kept) each produce C // len(dilations) channels; their concatenation goes through
    norm -> LeakyReLU -> 1x1 conv -> norm -> LeakyReLU back to C channels and is added to the
    input. One block thus reaches max(dilations) positions in each direction.

    Maps (B, C, H, W) to (B, C, H, W).
    """

    def __init__(self, channels: int, dilations: Sequence[int], norm: str) -> None:
        super().__init__()
        branch = channels // len(dilations)
        if branch < 1:
            raise ConfigError(
                f"{channels} bottleneck channels cannot be split among {len(dilations)} dilations"
            )
        self.branches = nn.ModuleList(
            nn.Conv2d(channels, branch, 3, padding=d, dilation=d, bias=False) for d in dilations
        )
        self.fuse = nn.Sequential(
            blocks.make_norm(norm, branch * len(dilations)),
            nn.LeakyReLU(blocks.NEGATIVE_SLOPE, inplace=True),
            blocks.conv_norm_act(branch * len(dilations), channels, norm, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([conv(x) for conv in self.branches], dim=1)  # (B, n * C // n, H, W)
        return x + self.fuse(y)  # (B, C, H, W)


class ConvexCombination(nn.Module):
    """Convex combination module (CCM) merging an encoder skip ``e`` into a decoder feature ``d``.

    ``out = a * e + (1 - a) * d`` with ``a = sigmoid(conv([e, d]))``, where ``[e, d]`` is the
    channel concatenation and a 1x1 conv produces C channels, so ``a`` is a learned per-pixel,
    per-channel coefficient in [0, 1] (Bauer et al., arXiv:2206.11723; Mathematics 2024). The
    network can thus fall back on the decoder where the encoder feature looks anomalous instead
    of copying it through the skip.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gate = nn.Conv2d(2 * channels, channels, 1)

    def coefficient(self, e: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """The mixing coefficient ``a`` (B, C, H, W) in [0, 1] for ``e``, ``d`` (B, C, H, W)."""
        return torch.sigmoid(self.gate(torch.cat([e, d], dim=1)))

    def forward(self, e: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        a = self.coefficient(e, d)  # (B, C, H, W)
        return a * e + (1 - a) * d


class ConcatFuse(nn.Module):
    """Ablation of the CCM: concatenate ``e`` and ``d`` (B, C, H, W) and fuse by a 1x1 conv."""

    def __init__(self, channels: int, norm: str) -> None:
        super().__init__()
        self.fuse = blocks.conv_norm_act(2 * channels, channels, norm, kernel_size=1)

    def forward(self, e: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([e, d], dim=1))  # (B, C, H, W)


class UpStage(nn.Module):
    """3x3 conv, upsample x2, merge the encoder skip, then a 3x3 conv.

    Maps d (B, C_in, h, w) and the skip e (B, C_out, 2h, 2w) to (B, C_out, 2h, 2w).
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str, skip: str) -> None:
        super().__init__()
        # Convolving before upsampling costs a quarter; the refining conv after the merge
        # smooths the nearest-neighbour blocks.
        self.up = nn.Sequential(
            blocks.conv_norm_act(in_channels, out_channels, norm),
            nn.Upsample(scale_factor=2, mode="nearest"),
        )
        if skip == "ccm":
            self.merge = ConvexCombination(out_channels)
        elif skip == "concat":
            self.merge = ConcatFuse(out_channels, norm)
        else:
            self.merge = None
        self.refine = blocks.conv_norm_act(out_channels, out_channels, norm)

    def forward(self, d: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        d = self.up(d)  # (B, C_out, 2h, 2w)
        if self.merge is not None:
            d = self.merge(e, d)
        return self.refine(d)


class SDCCCMAutoencoder(nn.Module):
    """SDC-CCM autoencoder (Model II, after Bauer et al. 2022/2024).

    With n = len(channels), the encoder yields features at resolutions 1, 1/2, ..., 1/2^(n-1)
    with widths ``channels``; ``num_sdc_blocks`` SDC blocks process the lowest one; the decoder
    upsamples back, merging the encoder feature of each resolution through the chosen skip.

    Args:
        in_channels: Image channels; the output has the same number.
        channels: Encoder widths per resolution, the first at full resolution. The default keeps
            a 128 px batch of 16 at about 0.5 s per training step on 2 CPU cores; (32, 64, 128)
            takes about 2 s.
        num_sdc_blocks: Number of SDC blocks in the bottleneck (0 for none).
        dilations: Dilation rates of the parallel branches of each SDC block.
        skip: "ccm" (convex combination), "concat" (concatenate + 1x1 conv) or "none".
        sdc: False replaces every dilation by 1 (same parameter count, small receptive field).
        norm: "batch", "instance", "group" or "none".
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: Sequence[int] = (16, 32, 64),
        num_sdc_blocks: int = 4,
        dilations: Sequence[int] = (1, 2, 4, 8, 16, 32),
        skip: str = "ccm",
        sdc: bool = True,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        channels = blocks.check_widths(in_channels, channels)
        dilations = tuple(int(d) for d in dilations)
        if not dilations or min(dilations) < 1 or num_sdc_blocks < 0:
            raise ConfigError(
                "dilations must be a non-empty list of ints >= 1 and num_sdc_blocks >= 0, "
                f"got {dilations}, {num_sdc_blocks}"
            )
        if skip not in SKIPS:
            raise ConfigError(f"unknown skip {skip!r}; expected one of {SKIPS}")
        blocks.check_norm(norm)
        self.in_channels = in_channels
        self.num_down = len(channels) - 1
        # H and W must be multiples of this (every encoder stage after the first halves them).
        self.stride = 2**self.num_down
        if not sdc:
            dilations = (1,) * len(dilations)

        self.stem = blocks.conv_norm_act(in_channels, channels[0], norm)
        self.down = nn.ModuleList(
            nn.Sequential(  # (B, C_i, h, w) -> (B, C_i+1, h / 2, w / 2)
                blocks.conv_norm_act(channels[i], channels[i + 1], norm, stride=2),
                blocks.conv_norm_act(channels[i + 1], channels[i + 1], norm),
            )
            for i in range(self.num_down)
        )
        self.bottleneck = nn.Sequential(
            *(SDCBlock(channels[-1], dilations, norm) for _ in range(num_sdc_blocks))
        )
        self.up = nn.ModuleList(
            UpStage(channels[i + 1], channels[i], norm, skip)
            for i in reversed(range(self.num_down))
        )
        self.head = nn.Sequential(nn.Conv2d(channels[0], in_channels, 3, padding=1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruct a batch of images.

        Args:
            x: Images (B, in_channels, H, W), H and W divisible by 2 ** (len(channels) - 1).

        Returns:
            Reconstructions (B, in_channels, H, W) in [0, 1].
        """
        blocks.check_image_batch(x, self.in_channels)
        blocks.check_divisible(x.shape[2], x.shape[3], self.num_down)
        skips = [self.stem(x)]  # (B, C_0, H, W)
        for stage in self.down:
            skips.append(stage(skips[-1]))  # (B, C_i, H / 2^i, W / 2^i)
        d = self.bottleneck(skips.pop())  # (B, C_last, H / 2^(n-1), W / 2^(n-1))
        for stage in self.up:
            d = stage(d, skips.pop())  # (B, C_i, H / 2^i, W / 2^i)
        return self.head(d)  # (B, in_channels, H, W)
