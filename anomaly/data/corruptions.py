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
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# A change below one 8-bit grey level is invisible once the image is quantised, so such pixels
# must not be labelled as anomalous.
CHANGE_TOLERANCE = 1.0 / 255.0
# Blob shapes of `corrupt`: covered fraction of the image, and the largest length/width ratio.
# Small and thin shapes too: real defects are often scratches and cracks a few pixels wide.
AREA_RANGE = (0.001, 0.2)
MAX_ASPECT = 12.0

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Decoded DTD images are at most ~640x640x3 bytes; 32 of them bound each worker to ~40 MB.
_CACHE_SIZE = 32
# An elastic warp counts as visible when >= 5% of its blob changes by > 25 grey levels; warps of
# flat background would otherwise give invisible "defects" (on 128 px capsule images ~40% of
# draws pass, so 6 tries fail ~4% of the time).
_VISIBLE_CHANGE = 0.1
_MIN_VISIBLE_FRACTION = 0.05
_ELASTIC_TRIES = 6
_CORRUPT_TRIES = 10


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


def _check_size(height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height}x{width}")


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Value noise: a coarse random grid upsampled bicubically.

    Returns:
        float32 array of shape (H, W), values roughly in [-1, 1], correlated over ~``cell`` pixels.
    """
    grid_h = max(2, math.ceil(height / cell) + 1)
    grid_w = max(2, math.ceil(width / cell) + 1)
    grid = rng.uniform(-1.0, 1.0, size=(grid_h, grid_w)).astype(np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


def _fractal_noise(
    rng: np.random.Generator, height: int, width: int, cell: float, octaves: int = 3
) -> np.ndarray:
    """Sum of value-noise octaves, each half the cell size and half the amplitude of the last.

    Returns:
        float32 array of shape (H, W), values roughly in [-1, 1].
    """
    total = np.zeros((height, width), np.float32)
    for octave in range(octaves):
        total += 0.5**octave * _smooth_noise(rng, height, width, max(1.0, cell / 2**octave))
    return total / (2.0 - 0.5 ** (octaves - 1))


def _rotated_coords(
    rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates rotated by a random angle, each (H, W) float32."""
    angle = rng.uniform(0.0, math.pi)
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    cos, sin = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    return xs * cos + ys * sin, -xs * sin + ys * cos


def _two_colours(rng: np.random.Generator, pattern: np.ndarray) -> np.ndarray:
    """Map a pattern in [0, 1] of shape (H, W) to an (H, W, 3) blend of two random colours."""
    low, high = rng.random(3, dtype=np.float32), rng.random(3, dtype=np.float32)
    return low + pattern[..., None] * (high - low)


def _noise_texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    cell = rng.uniform(4.0, 0.5 * max(height, width) + 4.0)
    pattern = np.clip(0.5 + 0.5 * _fractal_noise(rng, height, width, cell, octaves=4), 0.0, 1.0)
    return _two_colours(rng, pattern)


def _stripes_texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    u, _ = _rotated_coords(rng, height, width)
    period = rng.uniform(3.0, max(4.0, 0.3 * min(height, width)))
    wave = np.sin(u * np.float32(2 * math.pi / period) + np.float32(rng.uniform(0, 2 * math.pi)))
    # A random gain between soft sine stripes and hard bars.
    pattern = np.clip(0.5 + 0.5 * np.float32(rng.uniform(1.0, 8.0)) * wave, 0.0, 1.0)
    return _two_colours(rng, pattern)


def _checkers_texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    u, v = _rotated_coords(rng, height, width)
    period = np.float32(rng.uniform(2.0, max(3.0, 0.2 * min(height, width))))
    pattern = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    return _two_colours(rng, pattern)


def _dots_texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    u, v = _rotated_coords(rng, height, width)
    period = np.float32(rng.uniform(4.0, max(5.0, 0.2 * min(height, width))))
    # Distance to the nearest lattice point, in units of the lattice period.
    du = u / period - np.round(u / period)
    dv = v / period - np.round(v / period)
    pattern = (du * du + dv * dv < np.float32(rng.uniform(0.02, 0.2))).astype(np.float32)
    return _two_colours(rng, pattern)


def _colour_field_texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    grid = rng.random((int(rng.integers(2, 9)), int(rng.integers(2, 9)), 3), dtype=np.float32)
    return np.clip(cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)


_PROCEDURAL_TEXTURES: tuple[Callable[[np.random.Generator, int, int], np.ndarray], ...] = (
    _noise_texture,
    _stripes_texture,
    _checkers_texture,
    _dots_texture,
    _colour_field_texture,
)


class TextureSource:
    """Random textures: crops of DTD images, or procedural patterns when no folder is given.

    Files are listed once at construction and decoded lazily into a small per-process cache, so
    the object is cheap to build and to pickle into DataLoader workers.

    Args:
        dtd_root: Folder in DTD layout, ``<dtd_root>/images/<category>/*.jpg`` (.jpeg and .png
            accepted), or None for procedural textures (fractal noise, stripes, checkers, dots,
            random colour fields).

    Raises:
        ValueError: If ``dtd_root`` does not exist, is not a folder, or holds no images.
    """

    def __init__(self, dtd_root: str | Path | None) -> None:
        self.dtd_root = None if dtd_root is None else Path(dtd_root)
        self.files: list[Path] = []
        if self.dtd_root is not None:
            if not self.dtd_root.is_dir():
                raise ValueError(f"dtd_root {self.dtd_root} does not exist or is not a folder")
            self.files = sorted(
                path
                for path in self.dtd_root.glob("images/*/*")
                if path.suffix.lower() in _IMAGE_SUFFIXES and path.is_file()
            )
            if not self.files:
                raise ValueError(
                    f"dtd_root {self.dtd_root} holds no images: expected "
                    "images/<category>/*.jpg|.jpeg|.png"
                )
        self._cache: OrderedDict[Path, np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict:
        # Workers start with an empty cache rather than receiving decoded images over a pipe.
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, path: Path) -> np.ndarray:
        image = self._cache.get(path)
        if image is None:
            with Image.open(path) as handle:
                image = np.asarray(handle.convert("RGB"), dtype=np.uint8)
            self._cache[path] = image
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return image

    def sample(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        """Draw one random texture.

        A DTD image is chosen at random, rotated by a multiple of 90 degrees, maybe flipped, and a
        random crop with the target aspect ratio (30-100% of the largest such crop) is resized.

        Args:
            rng: Random generator; the only source of randomness.
            height: Output height H.
            width: Output width W.

        Returns:
            float32 array of shape (H, W, 3) with values in [0, 1].
        """
        _check_size(height, width)
        if not self.files:
            kind = int(rng.integers(len(_PROCEDURAL_TEXTURES)))
            return np.ascontiguousarray(_PROCEDURAL_TEXTURES[kind](rng, height, width))

        source = self._load(self.files[int(rng.integers(len(self.files)))])
        source = np.rot90(source, k=int(rng.integers(4)))
        if rng.random() < 0.5:
            source = source[:, ::-1]
        src_h, src_w = source.shape[:2]
        if src_h * width >= src_w * height:
            max_h, max_w = src_w * height / width, src_w
        else:
            max_h, max_w = src_h, src_h * width / height
        scale = rng.uniform(0.3, 1.0)
        crop_h = min(src_h, max(1, round(scale * max_h)))
        crop_w = min(src_w, max(1, round(scale * max_w)))
        top = int(rng.integers(src_h - crop_h + 1))
        left = int(rng.integers(src_w - crop_w + 1))
        crop = np.ascontiguousarray(source[top : top + crop_h, left : left + crop_w])
        shrinking = crop_h * crop_w > height * width
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        resized = cv2.resize(crop, (width, height), interpolation=interpolation)
        return resized.astype(np.float32) * np.float32(1.0 / 255.0)


def blob_mask(
    rng: np.random.Generator,
    height: int,
    width: int,
    min_area: float = 0.005,
    max_area: float = 0.25,
    max_blobs: int = 3,
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

    Returns:
        bool array of shape (H, W) with at least one True pixel.
    """
    _check_size(height, width)
    if not 0.0 < min_area <= max_area <= 1.0:
        raise ValueError(f"need 0 < min_area <= max_area <= 1, got {min_area}, {max_area}")
    if max_blobs < 1:
        raise ValueError(f"max_blobs must be >= 1, got {max_blobs}")

    pixels = height * width
    area = math.exp(rng.uniform(math.log(min_area), math.log(max_area)))
    keep = min(pixels, max(1, round(area * pixels)))
    blobs = int(rng.integers(1, max_blobs + 1))
    radius = math.sqrt(keep / (math.pi * blobs))

    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    distance = np.full((height, width), np.inf, np.float32)
    for _ in range(blobs):
        centre_y, centre_x = rng.uniform(0, height), rng.uniform(0, width)
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
    field = roughness * _fractal_noise(rng, height, width, cell) - distance
    threshold = np.partition(field.ravel(), pixels - keep)[pixels - keep]
    return field >= threshold


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
) -> tuple[np.ndarray, np.ndarray]:
    height, width = image.shape[:2]
    region = blob_mask(rng, height, width, *area_range)
    texture = textures.sample(rng, height, width)
    opacity = np.float32(rng.uniform(*opacity_range))
    return _finalize(image, image + opacity * (texture - image), region)


def _elastic(
    image: np.ndarray,
    rng: np.random.Generator,
    strength_range: tuple[float, float],
    area_range: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    height, width = image.shape[:2]
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    for _ in range(_ELASTIC_TRIES):
        region = blob_mask(rng, height, width, *area_range)
        radius = math.sqrt(region.sum() / math.pi)

        # Distance to the nearest pixel outside the blob: 0 outside, >= 1 inside.
        inside = cv2.distanceTransform(region.astype(np.uint8), cv2.DIST_L2, 3)
        ramp = np.clip(inside / np.float32(max(1.0, 0.5 * radius)), 0.0, 1.0)
        weight = ramp * ramp * (3.0 - 2.0 * ramp)  # smoothstep: the warp fades in without a kink

        amplitude = np.float32(max(2.0, radius * rng.uniform(*strength_range)))
        cell = max(2.0, radius * rng.uniform(0.5, 1.0))
        map_x = xs + _smooth_noise(rng, height, width, cell) * amplitude * weight
        map_y = ys + _smooth_noise(rng, height, width, cell) * amplitude * weight
        candidate = cv2.remap(
            image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
        )
        visible = _max_channel_change(image, candidate)[region] > _VISIBLE_CHANGE
        if visible.mean() >= _MIN_VISIBLE_FRACTION:
            break
    return _finalize(image, candidate, region)


def texture_corruption(
    image: np.ndarray,
    rng: np.random.Generator,
    textures: TextureSource,
    min_opacity: float = 0.2,
    max_opacity: float = 1.0,
    min_area: float = 0.005,
    max_area: float = 0.25,
) -> tuple[np.ndarray, np.ndarray]:
    """Blend a random texture into the image inside a random blob, as in DRAEM.

    Args:
        image: float32 (H, W, 3) in [0, 1].
        rng: Random generator; the only source of randomness.
        textures: Where textures come from.
        min_opacity: Smallest blend weight of the texture.
        max_opacity: Largest blend weight of the texture.
        min_area: Smallest blob area as a fraction of the image.
        max_area: Largest blob area as a fraction of the image.

    Returns:
        corrupted float32 (H, W, 3) in [0, 1], and mask float32 (H, W) in {0, 1} marking exactly
        the changed pixels.
    """
    _check_image(image)
    if not 0.0 <= min_opacity <= max_opacity <= 1.0:
        raise ValueError(
            f"need 0 <= min_opacity <= max_opacity <= 1, got {min_opacity}, {max_opacity}"
        )
    corrupted, mask = _texture(
        image, rng, textures, (min_opacity, max_opacity), (min_area, max_area)
    )
    return corrupted, mask.astype(np.float32)


def elastic_corruption(
    image: np.ndarray,
    rng: np.random.Generator,
    min_strength: float = 0.3,
    max_strength: float = 0.8,
    min_area: float = 0.005,
    max_area: float = 0.25,
) -> tuple[np.ndarray, np.ndarray]:
    """Warp the image locally with a smooth random displacement field inside a random blob.

    The displacement is scaled by a weight that rises smoothly from exactly 0 on the blob
    boundary to 1 inside, so the warp has no seam and leaves every pixel outside the blob intact.
    A warp of a flat area changes little, so a blob is redrawn (a few times at most) until the
    warp is clearly visible in part of it; the mask can still be small, or empty for a constant
    image.

    Args:
        image: float32 (H, W, 3) in [0, 1].
        rng: Random generator; the only source of randomness.
        min_strength: Smallest displacement amplitude, in units of the blob radius.
        max_strength: Largest displacement amplitude, in units of the blob radius.
        min_area: Smallest blob area as a fraction of the image.
        max_area: Largest blob area as a fraction of the image.

    Returns:
        corrupted float32 (H, W, 3) in [0, 1], and mask float32 (H, W) in {0, 1} marking exactly
        the changed pixels.
    """
    _check_image(image)
    if not 0.0 <= min_strength <= max_strength:
        raise ValueError(
            f"need 0 <= min_strength <= max_strength, got {min_strength}, {max_strength}"
        )
    corrupted, mask = _elastic(image, rng, (min_strength, max_strength), (min_area, max_area))
    return corrupted, mask.astype(np.float32)


def corrupt(
    image: np.ndarray,
    rng: np.random.Generator,
    textures: TextureSource,
    texture_prob: float = 0.5,
    elastic_prob: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply a texture and/or an elastic corruption (default settings), drawn independently.

    If neither is drawn the draw is repeated, so the image is always corrupted unless both
    probabilities are 0 (then the image comes back unchanged with an all-zero mask). A draw whose
    mask came out empty (only possible for nearly flat images) is repeated a few times.

    Args:
        image: float32 (H, W, 3) in [0, 1].
        rng: Random generator; the only source of randomness.
        textures: Where textures come from.
        texture_prob: Probability of the texture corruption.
        elastic_prob: Probability of the elastic corruption.

    Returns:
        corrupted float32 (H, W, 3) in [0, 1], and mask float32 (H, W) in {0, 1} marking exactly
        the changed pixels (within the union of both corruptions' blobs).
    """
    _check_image(image)
    for name, prob in (("texture_prob", texture_prob), ("elastic_prob", elastic_prob)):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {prob}")
    if texture_prob == 0.0 and elastic_prob == 0.0:
        return image.copy(), np.zeros(image.shape[:2], np.float32)

    area_range = AREA_RANGE
    for _ in range(_CORRUPT_TRIES):
        use_texture, use_elastic = False, False
        while not (use_texture or use_elastic):
            use_texture = rng.random() < texture_prob
            use_elastic = rng.random() < elastic_prob
        corrupted, region = image, np.zeros(image.shape[:2], bool)
        if use_texture:
            corrupted, mask = _texture(corrupted, rng, textures, (0.2, 1.0), area_range)
            region |= mask
        if use_elastic:
            corrupted, mask = _elastic(corrupted, rng, (0.3, 0.8), area_range)
            region |= mask
        # The warp may move texture back over its own origin, so re-check against the original.
        corrupted, mask = _finalize(image, corrupted, region)
        if mask.any():
            break
    return corrupted, mask.astype(np.float32)
