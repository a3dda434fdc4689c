"""Reading image and mask files: the accepted suffixes, and one-line errors for bad files.

Every image (dataset images, masks, textures) is decoded once by PIL in `open_image`, which
catches empty, truncated and unreadable files. Pixels of more than 8 bits are then scaled to
uint8 by value * 255 / max, max being 65535 for 16-bit integers ("I;16*" and "I", where PIL opens
16-bit files as 32-bit "I") and 1 for 32-bit floats ("F"). 16-bit RGB(A) files PIL decodes to
8 bits itself, keeping the high byte (value // 256, within 1 of value * 255 / 65535).
"""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from anomaly.errors import DatasetError

# Every image file the project reads (datasets and textures) has one of these suffixes.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# The largest value of a 16-bit pixel; deep integer pixels are scaled from 0..MAX_16BIT.
MAX_16BIT = 65535

# How many of a mask's distinct values a problem message lists.
_SHOWN_VALUES = 6


def image_files(folder: Path) -> list[Path]:
    """The image files directly in `folder`, sorted."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def open_image(path: Path) -> Image.Image:
    """Open and decode an image, so truncated files fail here and not in a worker."""
    if path.stat().st_size == 0:
        raise DatasetError(f"{path}: file is empty (0 bytes)")
    try:
        image = Image.open(path)
        image.load()
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise DatasetError(f"{path}: unreadable or truncated image ({err})") from None
    return image


def is_deep(mode: str) -> bool:
    """Whether a PIL mode holds one channel of more than 8 bits ("I;16*", "I" or "F")."""
    return mode in ("I", "F") or mode.startswith("I;16")


def _value_range(pixels: np.ndarray) -> str:
    """The range of an array's values as text, e.g. "[0, 70000]"."""
    return f"[{pixels.min():g}, {pixels.max():g}]"


def scale_deep(pixels: np.ndarray, mode: str, path: Path) -> np.ndarray:
    """Scale one channel of more than 8 bits to uint8, rounding to the nearest level.

    Args:
        pixels: The values as stored, (H, W), of PIL mode `mode`.
        mode: "F" (floats, expected in [0, 1]), or "I" / "I;16*" (integers in 0..65535).
        path: The file, named in errors.

    Returns:
        uint8 array (H, W).

    Raises:
        DatasetError: If a value lies outside the expected range, or a float is not finite.
    """
    if mode == "F":
        if not np.isfinite(pixels).all():
            raise DatasetError(f"{path}: float image (mode F) holds NaN or infinite values")
        if pixels.min() < 0.0 or pixels.max() > 1.0:
            raise DatasetError(
                f"{path}: float image (mode F) has values in {_value_range(pixels)}; "
                "expected values in [0, 1]"
            )
        return np.rint(pixels * 255.0).astype(np.uint8)
    if pixels.min() < 0 or pixels.max() > MAX_16BIT:
        raise DatasetError(
            f"{path}: integer image (mode {mode}) has values in {_value_range(pixels)}; "
            f"expected 16-bit values in [0, {MAX_16BIT}]"
        )
    levels = pixels.astype(np.int64)
    return ((levels * 255 + MAX_16BIT // 2) // MAX_16BIT).astype(np.uint8)


def rgb_pixels(image: Image.Image, path: Path) -> np.ndarray:
    """The pixels of a decoded image as uint8 RGB; grayscale is repeated to 3 channels.

    Raises:
        DatasetError: If a deep image's values are outside their range (see `scale_deep`).
    """
    if is_deep(image.mode):
        gray = scale_deep(np.asarray(image), image.mode, path)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def read_rgb(path: Path) -> np.ndarray:
    """Read an image file as uint8 RGB (H, W, 3) at its own size.

    Raises:
        DatasetError: If the file is empty, unreadable or truncated, or its values out of range.
    """
    return rgb_pixels(open_image(path), path)


def resize_rgb(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 RGB pixels (h, w, 3) to size=(H, W) as every model input is resized."""
    return A.Resize(*size, interpolation=cv2.INTER_AREA)(image=pixels)["image"]


def load_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Read an image as RGB (grayscale is repeated to 3 channels) resized to size=(H, W).

    Returns:
        uint8 array (H, W, 3).
    """
    return resize_rgb(read_rgb(path), size)


def mask_levels(image: Image.Image) -> np.ndarray:
    """The gray levels of a decoded mask as stored, one channel and not rescaled.

    16-bit and float masks keep their values; colour masks become luminance.
    """
    if is_deep(image.mode):
        return np.asarray(image)
    return np.asarray(image if image.mode == "L" else image.convert("L"))


def binarize_mask(levels: np.ndarray) -> np.ndarray:
    """Defect (1) where a level is above half the mask's maximum, normal (0) elsewhere.

    A two-level mask {0, v} becomes defect exactly where it is v, whatever v > 0 is.

    Returns:
        uint8 array of the shape of `levels`, values {0, 1}; all zeros when no level is above 0.
    """
    top = levels.max()
    if not top > 0:
        return np.zeros(levels.shape, dtype=np.uint8)
    return (levels > top / 2).astype(np.uint8)


def mask_problem(levels: np.ndarray) -> str | None:
    """What is wrong with a mask's gray levels, or None for a two-level mask {0, v}, v > 0.

    Returns:
        A message without the file name (the caller prefixes it), or None.
    """
    values = np.unique(levels)
    defect_values = values[values != 0]
    expected = "expected 0 for normal pixels and one value for defect pixels (e.g. 0 and 255)"
    if not np.isfinite(values).all() or values.min() < 0 or len(defect_values) > 1:
        shown = ", ".join(f"{value:g}" for value in values[:_SHOWN_VALUES].tolist())
        more = ", ..." if len(values) > _SHOWN_VALUES else ""
        return f"mask has {len(values)} distinct values ({shown}{more}); {expected}"
    if not len(defect_values):
        return "mask is empty: all its pixels are 0, so its defective image has no defect pixel"
    if values[0] != 0:
        return f"mask has no 0 pixel (every pixel is {values[0]:g}); {expected}"
    return None


def load_mask(path: Path | None, size: tuple[int, int]) -> np.ndarray:
    """Read a ground-truth mask, binarized (see `binarize_mask`) then resized without blurring.

    Returns:
        uint8 array (H, W) with values {0, 1}; all zeros when path is None.
    """
    if path is None:
        return np.zeros(size, dtype=np.uint8)
    mask = binarize_mask(mask_levels(open_image(path)))
    return A.Resize(*size, interpolation=cv2.INTER_NEAREST)(image=mask)["image"]
