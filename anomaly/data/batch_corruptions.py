"""The training corruptions of `anomaly.data.corruptions`, applied to a whole batch at once.

`data.corruption.device=model` moves the corruptions from the loader workers (numpy and OpenCV,
one sample at a time) to the device the model trains on: the Lightning module's batch hook calls
`BatchCorruption` on the clean batch, so the loader only decodes and resizes images. The recipe
and its distributions are the per-sample ones (`anomaly.data.corruptions`): a texture blended
into, and/or a smooth elastic warp inside, regions thresholded from noise around 1-3 noisy
ellipses covering a log-uniform share of the image. Three steps differ, for speed:
- Textures come from a bank built once (`texture_bank`): DTD images, their central square resized
  to the training size, or procedural patterns rendered by `anomaly.data.textures`. A draw crops,
  turns by a multiple of 90 degrees, flips and resizes one of them in one `grid_sample`.
- The noise is drawn on a grid a quarter of the image's side and upsampled; the ellipses are
  exact at full resolution, so thin shapes stay thin.
- A region's area is the drawn one up to the threshold being a quantile of every second pixel,
  and the warp fades in with the region's noise field, not with its distance transform.

Images are float ``(B, 3, H, W)`` in [0, 1]; masks float ``(B, 1, H, W)`` in {0, 1} mark exactly
the changed pixels, as in the per-sample path. Randomness comes only from the ``torch.Generator``
passed in; `BatchCorruption` seeds one per batch, from the run's seed and the batch's samples.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from anomaly.data.corruptions import (
    AREA_RANGE,
    CHANGE_TOLERANCE,
    CORRUPT_TRIES,
    ELASTIC_TRIES,
    MAX_ASPECT,
    MIN_VISIBLE_FRACTION,
    VISIBLE_CHANGE,
)
from anomaly.data.images import read_rgb
from anomaly.data.textures import TextureSource

# Noise is evaluated on a grid this many times coarser than the image, then upsampled.
NOISE_STRIDE = 4
# Procedural textures in the bank when no DTD folder is given.
PROCEDURAL_BANK = 256
# On the CPU a batch is corrupted in parts of at most this many pixels, which keep each pass in
# the cache (1.2x faster at 256 px on this project's 2-core machine); a GPU takes it whole.
CPU_CHUNK_PIXELS = 2**18
# Seeds the kept noise apart from the corruptions of the same samples.
NOISE_STREAM = 2_000_003


def texture_bank(source: TextureSource, size: int, seed: int) -> Tensor:
    """Textures for `BatchCorruption`, uint8 ``(N, 3, size, size)`` on the CPU.

    Args:
        source: DTD files (each image's central square, resized) or, without files,
            `PROCEDURAL_BANK` procedural patterns drawn with a generator seeded by `seed`.
        size: Side of the bank's textures: the training images' longer side.
        seed: Seeds the procedural patterns.
    """
    textures = []
    if source.files:
        for path in source.files:
            image = read_rgb(path)
            height, width = image.shape[:2]
            side = min(height, width)
            top, left = (height - side) // 2, (width - side) // 2
            square = np.ascontiguousarray(image[top : top + side, left : left + side])
            textures.append(cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA))
    else:
        rng = np.random.default_rng([seed, size])
        for _ in range(PROCEDURAL_BANK):
            texture = source.sample(rng, size, size)
            textures.append(np.round(texture * 255.0).astype(np.uint8))
    return torch.from_numpy(np.stack(textures)).permute(0, 3, 1, 2).contiguous()


def _uniform(generator: torch.Generator, count: int, low: float, high: float) -> Tensor:
    values = torch.rand(count, generator=generator, device=generator.device)
    return low + (high - low) * values


def _pixel_coordinates(height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Row and column coordinates, ``(H, 1)`` and ``(1, W)`` float32."""
    ys = torch.arange(height, dtype=torch.float32, device=device)[:, None]
    xs = torch.arange(width, dtype=torch.float32, device=device)[None, :]
    return ys, xs


def _coarse_noise(generator: torch.Generator, cell: Tensor, height: int, width: int) -> Tensor:
    """Value noise per sample on the coarse grid, ``(N, 1, ceil(H/4), ceil(W/4))``.

    Random knots ``cell[i]`` image pixels apart, read bicubically as `smooth_noise` does; detail
    finer than the coarse grid is left out.
    """
    count = cell.shape[0]
    coarse_h, coarse_w = math.ceil(height / NOISE_STRIDE), math.ceil(width / NOISE_STRIDE)
    spacing = (cell / NOISE_STRIDE).clamp(min=1.0)  # knot spacing in coarse pixels, (N,)
    knots_h = math.ceil(coarse_h / spacing.min().item()) + 2
    knots_w = math.ceil(coarse_w / spacing.min().item()) + 2
    device = generator.device
    knots = 2 * torch.rand(count, 1, knots_h, knots_w, generator=generator, device=device) - 1
    ys, xs = _pixel_coordinates(coarse_h, coarse_w, device)
    knot_y = (ys[None] + 0.5) / spacing[:, None, None]  # (N, h, 1)
    knot_x = (xs[None] + 0.5) / spacing[:, None, None]  # (N, 1, w)
    grid = torch.stack(
        (
            (2 * knot_x / (knots_w - 1) - 1).expand(count, coarse_h, coarse_w),
            (2 * knot_y / (knots_h - 1) - 1).expand(count, coarse_h, coarse_w),
        ),
        dim=-1,
    )
    return F.grid_sample(knots, grid, mode="bicubic", align_corners=True)


def _upsample(coarse: Tensor, height: int, width: int) -> Tensor:
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)


def _fractal_noise(
    generator: torch.Generator, cell: Tensor, height: int, width: int, octaves: int = 3
) -> Tensor:
    """`fractal_noise` per sample, ``(N, 1, H, W)``: octaves of half the cell and amplitude."""
    total = sum(
        0.5**octave * _coarse_noise(generator, (cell / 2**octave).clamp(min=1.0), height, width)
        for octave in range(octaves)
    )
    return _upsample(total / (2.0 - 0.5 ** (octaves - 1)), height, width)


def blob_regions(
    generator: torch.Generator,
    count: int,
    height: int,
    width: int,
    area_range: tuple[float, float] = AREA_RANGE,
    max_blobs: int = 3,
    where: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """`count` random blob regions, as `anomaly.data.corruptions.blob_mask` draws them; with
    `where` (bool ``(N, 1, H, W)``, a True pixel in each), the blobs' centres lie in its True
    pixels.

    Returns:
        regions bool ``(N, 1, H, W)``, each with at least one pixel; depth float ``(N, 1, H, W)``,
        how far each pixel's noise field lies above its region's threshold (negative outside);
        the blobs' common radius in pixels ``(N,)``.
    """
    pixels = height * width
    log_low, log_high = math.log(area_range[0]), math.log(area_range[1])
    area = _uniform(generator, count, log_low, log_high).exp()
    keep = (area * pixels).round().clamp(1, pixels)
    device = generator.device
    blobs = torch.randint(1, max_blobs + 1, (count,), generator=generator, device=device)
    radius = (keep / (math.pi * blobs)).sqrt()

    ys, xs = _pixel_coordinates(height, width, device)
    distance = None
    log_aspect = math.log(MAX_ASPECT)
    for blob in range(max_blobs):
        if where is None:
            centre_y = _uniform(generator, count, 0.0, height)
            centre_x = _uniform(generator, count, 0.0, width)
        else:
            pixel = torch.multinomial(where.flatten(1).float(), 1, generator=generator)[:, 0]
            centre_y = (pixel // width).float() + _uniform(generator, count, 0.0, 1.0)
            centre_x = (pixel % width).float() + _uniform(generator, count, 0.0, 1.0)
        angle = _uniform(generator, count, 0.0, math.pi)
        elongation = _uniform(generator, count, -log_aspect, log_aspect).exp().sqrt()
        size = radius * _uniform(generator, count, 0.6, 1.4)
        # Blobs beyond a sample's count sit far outside the image: they never come nearest.
        absent = blobs <= blob
        centre_y, centre_x = centre_y.masked_fill(absent, -1e6), centre_x.masked_fill(absent, -1e6)
        cos, sin = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1)
        along_scale = (1 / (size * elongation)).view(-1, 1, 1)
        across_scale = (elongation / size).view(-1, 1, 1)
        dy, dx = ys - centre_y.view(-1, 1, 1), xs - centre_x.view(-1, 1, 1)  # (N, H, 1), (N, 1, W)
        along = (dx * (cos * along_scale)) + (dy * (sin * along_scale))  # (N, H, W)
        across = (dy * (cos * across_scale)) - (dx * (sin * across_scale))
        squared = along.square_().add_(across.square_())
        distance = squared if distance is None else torch.minimum(distance, squared, out=distance)

    roughness = _uniform(generator, count, 0.3, 1.2).view(-1, 1, 1, 1)
    cell = (radius * _uniform(generator, count, 0.5, 1.0)).clamp(min=2.0)
    field = (_fractal_noise(generator, cell, height, width) * roughness).sub_(distance[:, None])

    # The threshold keeps the drawn share of every second pixel in each direction.
    sample = field[:, 0, ::2, ::2].reshape(count, -1)
    ranks = (keep / pixels * sample.shape[1]).round().clamp(1, sample.shape[1]).long()
    top = sample.topk(int(ranks.max()), dim=1).values
    threshold = top.gather(1, (ranks - 1)[:, None]).view(-1, 1, 1, 1)
    depth = field.sub_(threshold)
    return depth >= 0, depth, radius


def _max_channel_change(image: Tensor, candidate: Tensor) -> Tensor:
    """Largest absolute per-channel difference, ``(N, 3, H, W)`` x2 -> ``(N, 1, H, W)``."""
    return (candidate - image).abs_().amax(dim=1, keepdim=True)


def _texture_crops(generator: torch.Generator, bank: Tensor, height: int, width: int) -> Tensor:
    """Random crops of the bank's textures, ``(N, 3, H, W)`` float in [0, 1], N = len(bank)."""
    count = bank.shape[0]
    scale = _uniform(generator, count, 0.3, 1.0)
    # Half extents of a crop with the images' aspect ratio, in the bank's [-1, 1] coordinates.
    extent_x = scale * min(1.0, width / height)
    extent_y = scale * min(1.0, height / width)
    centre_x = (2 * _uniform(generator, count, 0.0, 1.0) - 1) * (1 - extent_x)
    centre_y = (2 * _uniform(generator, count, 0.0, 1.0) - 1) * (1 - extent_y)
    quarter = torch.randint(4, (count,), generator=generator, device=generator.device)
    flip = torch.where(_uniform(generator, count, 0.0, 1.0) < 0.5, -1.0, 1.0)
    cos = torch.tensor([1.0, 0.0, -1.0, 0.0], device=bank.device)[quarter].view(-1, 1, 1)
    sin = torch.tensor([0.0, 1.0, 0.0, -1.0], device=bank.device)[quarter].view(-1, 1, 1)

    ys, xs = _pixel_coordinates(height, width, bank.device)
    u = ((2 * xs + 1) / width - 1) * extent_x.view(-1, 1, 1) + centre_x.view(-1, 1, 1)
    v = ((2 * ys + 1) / height - 1) * extent_y.view(-1, 1, 1) + centre_y.view(-1, 1, 1)
    u = u * flip.view(-1, 1, 1)  # (N, 1, W), and v (N, H, 1)
    grid = torch.stack((u * cos - v * sin, u * sin + v * cos), dim=-1)
    return F.grid_sample(bank.float().div_(255.0), grid, mode="bilinear", align_corners=False)


def _texture(
    images: Tensor, generator: torch.Generator, bank: Tensor, where: Tensor | None
) -> tuple[Tensor, Tensor]:
    """A texture blended into a blob region of each image at opacity 0.2-1: the candidate
    images ``(N, 3, H, W)`` (the originals outside the regions) and the regions."""
    count, _, height, width = images.shape
    region, _, _ = blob_regions(generator, count, height, width, where=where)
    choice = torch.randint(bank.shape[0], (count,), generator=generator, device=generator.device)
    texture = _texture_crops(generator, bank[choice], height, width)
    opacity = _uniform(generator, count, 0.2, 1.0).view(-1, 1, 1, 1)
    # Both lie in [0, 1], so does their blend: no clamp is needed.
    return torch.where(region, images.lerp(texture, opacity), images), region


def _warp(
    images: Tensor, generator: torch.Generator, where: Tensor | None
) -> tuple[Tensor, Tensor]:
    """One elastic draw per image: the warped images and the blob regions."""
    count, _, height, width = images.shape
    region, depth, radius = blob_regions(generator, count, height, width, where=where)
    top = depth.amax(dim=(2, 3), keepdim=True)
    ramp = depth.div_(0.5 * top).clamp_(0.0, 1.0)
    weight = ramp.square() * (3.0 - 2.0 * ramp)  # smoothstep: the warp fades in without a kink
    amplitude = (radius * _uniform(generator, count, 0.3, 0.8)).clamp(min=2.0)
    cell = (radius * _uniform(generator, count, 0.5, 1.0)).clamp(min=2.0)
    # Shifts in grid_sample's [-1, 1] units (align_corners=True: 2 / (side - 1) per pixel).
    units = torch.tensor([2 / max(width - 1, 1), 2 / max(height - 1, 1)], device=images.device)
    shift = torch.cat([_coarse_noise(generator, cell, height, width) for _ in range(2)], dim=1)
    shift = shift * (amplitude.view(-1, 1, 1, 1) * units.view(1, 2, 1, 1))
    shift = _upsample(shift, height, width).mul_(weight)  # (N, 2, H, W): x, then y
    ys, xs = _pixel_coordinates(height, width, images.device)
    identity = torch.stack(
        torch.broadcast_tensors(xs * units[0] - 1, ys * units[1] - 1), dim=-1
    )  # (H, W, 2)
    grid = shift.permute(0, 2, 3, 1).add_(identity)
    warped = F.grid_sample(
        images, grid, mode="bilinear", padding_mode="reflection", align_corners=True
    )
    return warped, region


def _elastic(
    images: Tensor, generator: torch.Generator, where: Tensor | None
) -> tuple[Tensor, Tensor]:
    """A smooth elastic warp inside a blob region of each image, redrawn (6 draws at most)
    until at least 5% of the region changes by more than 25 grey levels, as the per-sample path
    does: the candidate images (the originals outside the regions) and the regions."""
    warped, region = _warp(images, generator, where)
    pending = torch.arange(images.shape[0], device=images.device)
    clean, candidate, inside = images, warped, region
    for _ in range(ELASTIC_TRIES - 1):
        visible = _max_channel_change(clean, candidate) > VISIBLE_CHANGE
        share = (visible & inside).sum(dim=(1, 2, 3)) / inside.sum(dim=(1, 2, 3))
        retry = share < MIN_VISIBLE_FRACTION
        if not retry.any():
            break
        pending, clean = pending[retry], clean[retry]
        candidate, inside = _warp(clean, generator, None if where is None else where[pending])
        warped[pending], region[pending] = candidate, inside
    return torch.where(region, warped, images), region


def corrupt_batch(
    images: Tensor,
    generator: torch.Generator,
    bank: Tensor,
    prob: float = 1.0,
    texture_prob: float = 0.5,
    elastic_prob: float = 0.5,
    on_object_prob: float = 0.0,
    foreground: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`anomaly.data.corruptions.corrupt` for a batch: each image is corrupted with chance `prob`
    by a texture and/or an elastic warp, drawn independently and redrawn when neither comes up;
    with chance `on_object_prob` its regions are centred on its object (`foreground`).

    Args:
        images: float ``(B, 3, H, W)`` in [0, 1].
        generator: The only source of randomness, on the images' device.
        bank: uint8 textures ``(T, 3, S, S)`` (`texture_bank`), on the images' device.
        prob: Chance an image is corrupted.
        texture_prob: Probability of the texture corruption.
        elastic_prob: Probability of the elastic corruption.
        on_object_prob: Chance an image's regions are centred in its `foreground` pixels.
        foreground: bool ``(B, 1, H, W)``, each image's object (a True pixel in each); needed
            when `on_object_prob` > 0.

    Returns:
        corrupted float ``(B, 3, H, W)`` and masks float ``(B, 1, H, W)`` in {0, 1} marking
        exactly the changed pixels (all zero for the images left clean).
    """
    count = images.shape[0]
    corrupted = images.clone()
    mask = torch.zeros(count, 1, *images.shape[2:], device=images.device)
    if texture_prob == 0.0 and elastic_prob == 0.0:
        return corrupted, mask
    pending = torch.nonzero(_uniform(generator, count, 0.0, 1.0) < prob).flatten()
    where = None
    if on_object_prob > 0:
        if foreground is None or foreground.shape != mask.shape:
            shape = None if foreground is None else tuple(foreground.shape)
            raise ValueError(f"on_object_prob > 0 needs a (B, 1, H, W) foreground, got {shape}")
        anywhere = _uniform(generator, count, 0.0, 1.0) >= on_object_prob
        where = foreground.bool() | anywhere.view(-1, 1, 1, 1)
    # Texture only, both, elastic only: the independent draws given that one came up.
    odds = [
        texture_prob * (1 - elastic_prob),
        texture_prob * elastic_prob,
        (1 - texture_prob) * elastic_prob,
    ]
    odds = torch.tensor(odds, dtype=torch.float32, device=images.device)
    for _ in range(CORRUPT_TRIES):
        if pending.numel() == 0:
            break
        kind = torch.multinomial(odds, pending.numel(), replacement=True, generator=generator)
        # Sorted by kind, the textured images come first and the warped ones last: both are
        # slices, corrupted in place without gathering them.
        kind, order = kind.sort(stable=True)
        pending = pending[order]
        textured = int((kind <= 1).sum())
        warped = textured - int((kind == 1).sum())
        clean = images[pending]
        inside = None if where is None else where[pending]
        candidate, region = clean.clone(), torch.zeros_like(mask[pending], dtype=torch.bool)
        if textured:
            candidate[:textured], region[:textured] = _texture(
                candidate[:textured], generator, bank, None if inside is None else inside[:textured]
            )
        if warped < len(pending):
            candidate[warped:], changed = _elastic(
                candidate[warped:], generator, None if inside is None else inside[warped:]
            )
            region[warped:] |= changed
        # The warp may move texture back over its own origin, so check against the original.
        region &= _max_channel_change(clean, candidate) > CHANGE_TOLERANCE
        corrupted[pending] = torch.where(region, candidate, clean)
        mask[pending] = region.float()
        pending = pending[~region.flatten(1).any(dim=1)]
    return corrupted, mask


class BatchCorruption:
    """The training corruptions of a run, applied to its batches on the training device.

    Args:
        bank: uint8 textures ``(T, 3, S, S)`` (`texture_bank`); moved to the batches' device once.
        seed: The run's seed; each batch's generator is seeded from it and the batch's samples.
        prob, texture_prob, elastic_prob, on_object_prob: as `corrupt_batch`.
        noise_std: deviation of the Gaussian noise `add_kept_noise` puts on input and target.
    """

    def __init__(
        self,
        bank: Tensor,
        seed: int,
        prob: float,
        texture_prob: float,
        elastic_prob: float,
        on_object_prob: float = 0.0,
        noise_std: float = 0.0,
    ) -> None:
        self.bank, self.seed = bank, seed
        self.prob, self.texture_prob, self.elastic_prob = prob, texture_prob, elastic_prob
        self.on_object_prob, self.noise_std = on_object_prob, noise_std

    def _generator(self, sample_ids: Tensor, device: torch.device, *stream: int) -> torch.Generator:
        words = [self.seed, *stream, *(int(i) for i in sample_ids.tolist())]
        seed = int(np.random.SeedSequence(words).generate_state(2, np.uint64)[0] >> 1)
        return torch.Generator(device=device).manual_seed(seed)

    def add_kept_noise(
        self, images: Tensor, corrupted: Tensor, sample_ids: Tensor
    ) -> tuple[Tensor, Tensor]:
        """`anomaly.data.corruptions.add_kept_noise` for a batch, seeded apart from the
        corruptions by the batch's samples: the noisy targets and the noisy inputs."""
        generator = self._generator(sample_ids, images.device, NOISE_STREAM)
        noise = torch.randn(
            images.shape, generator=generator, device=images.device, dtype=images.dtype
        ).mul_(self.noise_std)
        return (images + noise).clamp_(0.0, 1.0), (corrupted + noise).clamp_(0.0, 1.0)

    def __call__(
        self, images: Tensor, sample_ids: Tensor, foreground: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Corrupt one batch.

        Args:
            images: clean float ``(B, 3, H, W)`` in [0, 1].
            sample_ids: ``(B,)`` ints naming the batch's draws (the training set's epoch-encoded
                indices), so a batch's corruptions reproduce whatever order batches come in.
            foreground: bool ``(B, 1, H, W)``, the images' objects; needed when
                `on_object_prob` > 0.

        Returns:
            corrupted images and masks, as `corrupt_batch`.
        """
        if self.bank.device != images.device:
            self.bank = self.bank.to(images.device)
        generator = self._generator(sample_ids, images.device)
        height, width = images.shape[2:]
        part = len(images)
        if images.device.type == "cpu":
            part = max(1, CPU_CHUNK_PIXELS // (height * width))
        probs = (self.prob, self.texture_prob, self.elastic_prob, self.on_object_prob)
        objects = [None] * len(images.split(part)) if foreground is None else foreground.split(part)
        parts = [
            corrupt_batch(chunk, generator, self.bank, *probs, objects_of_chunk)
            for chunk, objects_of_chunk in zip(images.split(part), objects, strict=True)
        ]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
