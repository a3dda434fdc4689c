"""Random textures for the corruptions: crops of DTD images, or procedural patterns.

DTD: the Describable Textures Dataset (Cimpoi et al., CVPR 2014), blended into normal images by
DRAEM (Zavrtanik et al., ICCV 2021) and by Bauer, Nakajima, Müller (2024). Every function is a
pure function of a ``np.random.Generator`` and its arguments; images are float32 ``(H, W, 3)`` in
[0, 1].
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from anomaly.data.images import IMAGE_SUFFIXES, read_rgb
from anomaly.errors import DatasetError

# Decoded DTD images are at most ~640x640x3 bytes; 32 of them bound each worker to ~40 MB.
_CACHE_SIZE = 32


def check_size(height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height}x{width}")


def smooth_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Value noise: a coarse random grid upsampled bicubically.

    Returns:
        float32 array of shape (H, W), values roughly in [-1, 1], correlated over ~``cell`` pixels.
    """
    grid_h = max(2, math.ceil(height / cell) + 1)
    grid_w = max(2, math.ceil(width / cell) + 1)
    grid = rng.uniform(-1.0, 1.0, size=(grid_h, grid_w)).astype(np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


def fractal_noise(
    rng: np.random.Generator, height: int, width: int, cell: float, octaves: int = 3
) -> np.ndarray:
    """Sum of value-noise octaves, each half the cell size and half the amplitude of the last.

    Returns:
        float32 array of shape (H, W), values roughly in [-1, 1].
    """
    total = np.zeros((height, width), np.float32)
    for octave in range(octaves):
        total += 0.5**octave * smooth_noise(rng, height, width, max(1.0, cell / 2**octave))
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
    pattern = np.clip(0.5 + 0.5 * fractal_noise(rng, height, width, cell, octaves=4), 0.0, 1.0)
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
    the object is cheap to build and to pickle into DataLoader workers. A file that does not
    decode raises DatasetError when it is drawn; `check_textures` finds such files beforehand.

    Args:
        dtd_root: Folder in DTD layout, ``<dtd_root>/images/<category>/*.jpg`` (any suffix of
            ``IMAGE_SUFFIXES``), or None for procedural textures (fractal noise, stripes,
            checkers, dots, random colour fields).

    Raises:
        DatasetError: If ``dtd_root`` does not exist, is not a folder, or holds no images.
    """

    def __init__(self, dtd_root: str | Path | None) -> None:
        self.dtd_root = None if dtd_root is None else Path(dtd_root)
        self.files: list[Path] = []
        if self.dtd_root is not None:
            if not self.dtd_root.is_dir():
                raise DatasetError(f"{self.dtd_root}: dtd_root does not exist or is not a folder")
            self.files = sorted(
                path
                for path in self.dtd_root.glob("images/*/*")
                if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
            )
            if not self.files:
                raise DatasetError(
                    f"{self.dtd_root}: dtd_root holds no images; expected "
                    "images/<category>/*.jpg (or another image suffix)"
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
        """A decoded texture (H, W, 3) uint8, from the cache when it is there.

        Raises:
            DatasetError: If the file does not decode (`check_textures` finds these beforehand).
        """
        image = self._cache.get(path)
        if image is None:
            image = read_rgb(path)  # DatasetError naming the file when it does not decode
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
        check_size(height, width)
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


def check_textures(dtd_root: str | Path) -> list[str]:
    """Decode every texture file of a DTD-layout folder, as `TextureSource` will read it.

    A full decode (about 1 s for DTD's 1,200 images on one core) catches the files that opening
    alone accepts: truncated JPEGs, and files that are no image but have an image suffix.

    Args:
        dtd_root: Folder in DTD layout, ``<dtd_root>/images/<category>/*.jpg``.

    Returns:
        Problems, one line per file naming it (or one for the folder); empty when all decode.
    """
    try:
        files = TextureSource(dtd_root).files
    except DatasetError as err:
        return [str(err)]
    problems = []
    for path in files:
        try:
            read_rgb(path)
        except DatasetError as err:
            problems.append(str(err))
    return problems
