"""Self-supervised corruptions for training a restoration autoencoder.

A clean normal image is corrupted on the fly inside random blob-shaped regions; the network
learns to restore the clean image and the mask marks the corrupted pixels. The recipe follows
Bauer, Nakajima, Müller, "Self-supervised training with autoencoders for visual anomaly
detection" (2024) and DRAEM (Zavrtanik et al., ICCV 2021), which blends textures from the
Describable Textures Dataset (DTD, Cimpoi et al., CVPR 2014) into thresholded smooth-noise masks.

Every function is a pure function of (image, ``np.random.Generator``, arguments), so a run
reproduces exactly when the caller seeds the generator per (seed, epoch, sample index).

Conventions: images are float32 ``(H, W, 3)`` in [0, 1]; masks are float32 ``(H, W)`` in {0, 1}
and mark EXACTLY the pixels that changed: outside the mask the output is bit-identical to the
input, inside it at least one channel differs by more than ``CHANGE_TOLERANCE``.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from anomaly.data.textures import TextureSource, check_size, fractal_noise, smooth_noise

# A change below one 8-bit grey level is invisible once the image is quantised, so such pixels
# must not be labelled as anomalous.
CHANGE_TOLERANCE = 1.0 / 255.0
# Blob shapes of `corrupt`: covered fraction of the image, and the largest length/width ratio.
# Small and thin shapes too: real defects are often scratches and cracks a few pixels wide.
AREA_RANGE = (0.001, 0.2)
MAX_ASPECT = 12.0
# Texture opacity and warp strength (relative to the blob's radius) of `corrupt`.
OPACITY_RANGE = (0.2, 1.0)
WARP_RANGE = (0.3, 0.8)
# `corrupt(subtle=True)`: small, faint corruptions, like most real defects a small part of the
# image that barely stands out. Validation uses them: the training corruptions are so plain that
# the raw and the standardized score rank them alike (validation image AUROC 0.92-0.94 for both
# on a 45-minute capsule checkpoint), while on these the two differ by 0.04-0.09 on three
# capsule seeds (README, Results), so what is chosen on validation is not a coin flip.
SUBTLE_AREA_RANGE = (0.001, 0.01)
SUBTLE_OPACITY_RANGE = (0.1, 0.4)
SUBTLE_WARP_RANGE = (0.1, 0.3)

# An elastic warp counts as visible when >= 5% of its blob changes by > 25 grey levels; warps of
# flat background would otherwise give invisible "defects" (on 128 px capsule images ~40% of
# draws pass, so 6 tries fail ~4% of the time).
VISIBLE_CHANGE = 0.1
MIN_VISIBLE_FRACTION = 0.05
ELASTIC_TRIES = 6
CORRUPT_TRIES = 10
# `corrupt(scratch_prob=...)`: 1 to MAX_SCRATCHES thin bent lines with a texture blended in,
# like the scratches and cracks of real parts. Length as a share of the image's shorter side,
# width in pixels per 128 pixels of it (so the shape is the same at any image size).
MAX_SCRATCHES = 3
SCRATCH_LENGTH_RANGE = (0.05, 0.35)
SCRATCH_WIDTH_RANGE = (0.6, 2.5)
SCRATCH_BEND = 0.3
SCRATCH_OPACITY_RANGE = (0.2, 0.8)


def add_kept_noise(
    rng: np.random.Generator, clean: np.ndarray, corrupted: np.ndarray, std: float
) -> tuple[np.ndarray, np.ndarray]:
    """The same Gaussian noise of deviation `std` on a training pair: the target keeps the noise
    the input has, so the network learns to pass fine detail through and to repair only the
    corruption (identity-anchored noise: Bauer and Müller, "Noise & Pattern", arXiv 2511.07233,
    2025). Both are clipped to [0, 1]; the corruption mask is unchanged.

    Returns:
        the noisy clean image (the target) and the noisy corrupted image (the input).
    """
    noise = rng.normal(0.0, std, clean.shape).astype(np.float32)
    return np.clip(clean + noise, 0.0, 1.0), np.clip(corrupted + noise, 0.0, 1.0)


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise ValueError(f"image must be an np.ndarray of shape (H, W, 3), got shape {shape}")
    if image.dtype != np.float32:
        raise ValueError(f"image must be float32, got {image.dtype}")
    if image.size == 0:
        raise ValueError(f"image must not be empty, got shape {image.shape}")
    # Written as a negated conjunction so that NaN fails the check too.
    if not (image.min() >= 0.0 and image.max() <= 1.0):
        raise ValueError("image values must lie in [0, 1] (and not be NaN)")


def blob_mask(
    rng: np.random.Generator,
    height: int,
    width: int,
    min_area: float = 0.005,
    max_area: float = 0.25,
    max_blobs: int = 3,
    where: np.ndarray | None = None,
) -> np.ndarray:
    """Random blob-shaped region: 1 to ``max_blobs`` noisy ellipses.

    A field ``roughness * fractal_noise - min_i ellipse_distance_i**2`` is thresholded at the
    quantile that keeps a log-uniformly drawn fraction of the pixels, so the covered area is exact
    and never zero while the boundary is irregular, in the spirit of DRAEM's Perlin masks.

    Args:
        rng: Random generator; the only source of randomness.
        height: Mask height H.
        width: Mask width W.
        min_area: Smallest covered fraction of the image.
        max_area: Largest covered fraction of the image.
        max_blobs: Largest number of blob centres.
        where: bool (H, W): blob centres lie in its True pixels; None: anywhere.

    Returns:
        bool array of shape (H, W) with at least one True pixel.
    """
    check_size(height, width)
    if not 0.0 < min_area <= max_area <= 1.0:
        raise ValueError(f"need 0 < min_area <= max_area <= 1, got {min_area}, {max_area}")
    if max_blobs < 1:
        raise ValueError(f"max_blobs must be >= 1, got {max_blobs}")
    if where is not None:
        if where.shape != (height, width) or not where.any():
            raise ValueError(f"where must be a (H, W) mask with a True pixel, got {where.shape}")
        centres = np.flatnonzero(where)

    pixels = height * width
    area = math.exp(rng.uniform(math.log(min_area), math.log(max_area)))
    keep = min(pixels, max(1, round(area * pixels)))
    blobs = int(rng.integers(1, max_blobs + 1))
    radius = math.sqrt(keep / (math.pi * blobs))

    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    distance = np.full((height, width), np.inf, np.float32)
    for _ in range(blobs):
        if where is None:
            centre_y, centre_x = rng.uniform(0, height), rng.uniform(0, width)
        else:
            row, column = divmod(int(centres[rng.integers(centres.size)]), width)
            centre_y, centre_x = row + rng.uniform(0, 1), column + rng.uniform(0, 1)
        angle = rng.uniform(0.0, math.pi)
        log_aspect = math.log(MAX_ASPECT)
        elongation = math.sqrt(math.exp(rng.uniform(-log_aspect, log_aspect)))
        size = radius * rng.uniform(0.6, 1.4)
        cos, sin = math.cos(angle), math.sin(angle)
        along = ((xs - centre_x) * cos + (ys - centre_y) * sin) / (size * elongation)
        across = (-(xs - centre_x) * sin + (ys - centre_y) * cos) * (elongation / size)
        np.minimum(distance, along * along + across * across, out=distance)

    roughness = np.float32(rng.uniform(0.3, 1.2))
    cell = max(2.0, radius * rng.uniform(0.5, 1.0))
    field = roughness * fractal_noise(rng, height, width, cell) - distance
    threshold = np.partition(field.ravel(), pixels - keep)[pixels - keep]
    return field >= threshold


def scratch_mask(
    rng: np.random.Generator, height: int, width: int, where: np.ndarray | None = None
) -> np.ndarray:
    """Random scratch-shaped region: 1 to `MAX_SCRATCHES` thin, gently bent lines.

    Each line is a quadratic Bezier curve from a start point (in `where` when given) in a random
    direction, its middle pushed sideways by up to `SCRATCH_BEND` of its length, drawn
    `SCRATCH_WIDTH_RANGE` pixels wide per 128 pixels of the shorter side.

    Args:
        rng: Random generator; the only source of randomness.
        height: Mask height H.
        width: Mask width W.
        where: bool (H, W): the lines start in its True pixels and are cut to them; None:
            anywhere.

    Returns:
        bool array of shape (H, W) with at least one True pixel.
    """
    check_size(height, width)
    if where is not None:
        if where.shape != (height, width) or not where.any():
            raise ValueError(f"where must be a (H, W) mask with a True pixel, got {where.shape}")
        starts = np.flatnonzero(where)
    side = min(height, width)
    canvas = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(1, MAX_SCRATCHES + 1))):
        if where is None:
            start = np.array([rng.uniform(0, width), rng.uniform(0, height)])
        else:
            row, column = divmod(int(starts[rng.integers(starts.size)]), width)
            start = np.array([column + rng.uniform(0, 1), row + rng.uniform(0, 1)])
        length = side * rng.uniform(*SCRATCH_LENGTH_RANGE)
        angle = rng.uniform(0.0, 2.0 * math.pi)
        direction = np.array([math.cos(angle), math.sin(angle)])
        normal = np.array([-direction[1], direction[0]])
        end = start + length * direction
        control = (start + end) / 2 + normal * length * rng.uniform(-SCRATCH_BEND, SCRATCH_BEND)
        t = np.linspace(0.0, 1.0, max(8, round(length)))[:, None]
        curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end
        thickness = max(1, round(side / 128 * rng.uniform(*SCRATCH_WIDTH_RANGE)))
        points = np.round(curve).astype(np.int32)[None]
        cv2.polylines(canvas, points, False, 1, thickness, lineType=cv2.LINE_8)
    mask = canvas.astype(bool)
    # Kept within `where`, as real scratches stay on the part (unless that leaves nothing).
    if where is not None and (mask & where).any():
        mask &= where
    return mask


def _max_channel_change(image: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Largest absolute per-channel difference, (H, W, 3) x2 -> (H, W)."""
    diff = np.abs(candidate - image)
    # Explicit slices: numpy's reduction over a length-3 last axis is ~20x slower.
    return np.maximum(np.maximum(diff[..., 0], diff[..., 1]), diff[..., 2])


def _finalize(
    image: np.ndarray, candidate: np.ndarray, region: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Enforce the mask contract: mask = region & visibly changed; original pixels elsewhere.

    Returns:
        corrupted float32 (H, W, 3) and bool mask (H, W).
    """
    candidate = np.clip(candidate, 0.0, 1.0).astype(np.float32, copy=False)
    mask = region & (_max_channel_change(image, candidate) > CHANGE_TOLERANCE)
    return np.where(mask[..., None], candidate, image), mask


def _texture(
    image: np.ndarray,
    rng: np.random.Generator,
    textures: TextureSource,
    opacity_range: tuple[float, float],
    area_range: tuple[float, float],
    where: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    height, width = image.shape[:2]
    region = blob_mask(rng, height, width, *area_range, where=where)
    texture = textures.sample(rng, height, width)
    opacity = np.float32(rng.uniform(*opacity_range))
    return _finalize(image, image + opacity * (texture - image), region)


def _scratch(
    image: np.ndarray,
    rng: np.random.Generator,
    textures: TextureSource,
    opacity_range: tuple[float, float],
    where: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    height, width = image.shape[:2]
    region = scratch_mask(rng, height, width, where=where)
    texture = textures.sample(rng, height, width)
    opacity = np.float32(rng.uniform(*opacity_range))
    return _finalize(image, image + opacity * (texture - image), region)


def _elastic(
    image: np.ndarray,
    rng: np.random.Generator,
    strength_range: tuple[float, float],
    area_range: tuple[float, float],
    where: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    height, width = image.shape[:2]
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    for _ in range(ELASTIC_TRIES):
        region = blob_mask(rng, height, width, *area_range, where=where)
        radius = math.sqrt(region.sum() / math.pi)

        # Distance to the nearest pixel outside the blob: 0 outside, >= 1 inside.
        inside = cv2.distanceTransform(region.astype(np.uint8), cv2.DIST_L2, 3)
        ramp = np.clip(inside / np.float32(max(1.0, 0.5 * radius)), 0.0, 1.0)
        weight = ramp * ramp * (3.0 - 2.0 * ramp)  # smoothstep: the warp fades in without a kink

        amplitude = np.float32(max(2.0, radius * rng.uniform(*strength_range)))
        cell = max(2.0, radius * rng.uniform(0.5, 1.0))
        map_x = xs + smooth_noise(rng, height, width, cell) * amplitude * weight
        map_y = ys + smooth_noise(rng, height, width, cell) * amplitude * weight
        candidate = cv2.remap(
            image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
        )
        visible = _max_channel_change(image, candidate)[region] > VISIBLE_CHANGE
        if visible.mean() >= MIN_VISIBLE_FRACTION:
            break
    return _finalize(image, candidate, region)


def corrupt(
    image: np.ndarray,
    rng: np.random.Generator,
    textures: TextureSource,
    texture_prob: float = 0.5,
    elastic_prob: float = 0.5,
    subtle: bool = False,
    where: np.ndarray | None = None,
    scratch_prob: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply a texture and/or an elastic corruption (default settings), drawn independently;
    with chance `scratch_prob`, scratches (`scratch_mask`, a texture blended in) instead.

    If neither is drawn the draw is repeated, so the image is always corrupted unless both
    probabilities are 0 (then the image comes back unchanged with an all-zero mask). A draw whose
    mask came out empty (only possible for nearly flat images) is repeated a few times.

    Args:
        image: float32 (H, W, 3) in [0, 1].
        rng: Random generator; the only source of randomness.
        textures: Where textures come from.
        texture_prob: Probability of the texture corruption.
        elastic_prob: Probability of the elastic corruption.
        subtle: smaller regions, fainter textures and weaker warps (`SUBTLE_AREA_RANGE`, ...);
            fainter scratches.
        where: bool (H, W): the corrupted regions are centred in its True pixels (for example
            the object, `anomaly.data.foreground.foreground_mask`); None: anywhere.
        scratch_prob: Chance the corruption is scratches rather than blobs (needs
            `texture_prob` or `elastic_prob` above 0, as every corruption does).

    Returns:
        corrupted float32 (H, W, 3) in [0, 1], and mask float32 (H, W) in {0, 1} marking exactly
        the changed pixels (within the union of both corruptions' blobs).
    """
    _check_image(image)
    probs = {"texture_prob": texture_prob, "elastic_prob": elastic_prob}
    for name, prob in {**probs, "scratch_prob": scratch_prob}.items():
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {prob}")
    if texture_prob == 0.0 and elastic_prob == 0.0:
        return image.copy(), np.zeros(image.shape[:2], np.float32)
    area_range = SUBTLE_AREA_RANGE if subtle else AREA_RANGE
    opacity_range = SUBTLE_OPACITY_RANGE if subtle else OPACITY_RANGE
    # Drawn only when it can come up, so runs without scratches keep their random streams.
    if scratch_prob > 0.0 and rng.random() < scratch_prob:
        scratch_opacity = SUBTLE_OPACITY_RANGE if subtle else SCRATCH_OPACITY_RANGE
        for _ in range(CORRUPT_TRIES):
            corrupted, mask = _scratch(image, rng, textures, scratch_opacity, where)
            if mask.any():
                break
        return corrupted, mask.astype(np.float32)

    warp_range = SUBTLE_WARP_RANGE if subtle else WARP_RANGE
    for _ in range(CORRUPT_TRIES):
        use_texture, use_elastic = False, False
        while not (use_texture or use_elastic):
            use_texture = rng.random() < texture_prob
            use_elastic = rng.random() < elastic_prob
        corrupted, region = image, np.zeros(image.shape[:2], bool)
        if use_texture:
            corrupted, mask = _texture(corrupted, rng, textures, opacity_range, area_range, where)
            region |= mask
        if use_elastic:
            corrupted, mask = _elastic(corrupted, rng, warp_range, area_range, where)
            region |= mask
        # The warp may move texture back over its own origin, so re-check against the original.
        corrupted, mask = _finalize(image, corrupted, region)
        if mask.any():
            break
    return corrupted, mask.astype(np.float32)
