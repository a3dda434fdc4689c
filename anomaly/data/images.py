"""Reading image and mask files: the accepted suffixes, and one-line errors for bad files."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from anomaly.errors import DatasetError

# Every image file the project reads (datasets and textures) has one of these suffixes.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


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


def load_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Read an image as RGB (grayscale is repeated to 3 channels) resized to size=(H, W).

    Returns:
        uint8 array (H, W, 3).
    """
    image = np.asarray(open_image(path).convert("RGB"))
    return A.Resize(*size, interpolation=cv2.INTER_AREA)(image=image)["image"]


def load_mask(path: Path | None, size: tuple[int, int]) -> np.ndarray:
    """Read a ground-truth mask resized without blurring (nearest); all zeros when path is None.

    Returns:
        uint8 array (H, W) with values {0, 1}.
    """
    if path is None:
        return np.zeros(size, dtype=np.uint8)
    mask = np.asarray(open_image(path).convert("L"))
    mask = A.Resize(*size, interpolation=cv2.INTER_NEAREST)(image=mask)["image"]
    return (mask > 127 if mask.max() > 1 else mask > 0).astype(np.uint8)
