"""The object's pixels in a normal image: where validation's synthetic anomalies are centred."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from anomaly.data.foreground import foreground_mask
from anomaly.data.images import read_rgb
from anomaly.data.textures import fractal_noise
from tests.conftest import SHARED_MVTEC


def object_image(height: int, width: int, seed: int, grey: bool = False):
    """A disc and a bar, darker than a lightly noisy backdrop; returns the image and the object."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), (0.8, 0.75, 0.7), np.float32)
    image += rng.normal(0.0, 0.01, image.shape).astype(np.float32)
    shape = np.zeros((height, width), np.uint8)
    cv2.circle(shape, (width // 3, height // 2), min(height, width) // 5, 1, -1)
    cv2.rectangle(shape, (width // 2, height // 3), (4 * width // 5, height // 2), 1, -1)
    inside = shape.astype(bool)
    image[inside] = (0.3, 0.2, 0.1)
    if grey:
        image[:] = image.mean(axis=2, keepdims=True)
    return np.clip(image, 0.0, 1.0), inside


@pytest.mark.parametrize(
    ("height", "width", "grey"), [(64, 64, False), (128, 128, True), (53, 97, False)]
)
def test_the_object_is_told_from_a_plain_backdrop(height, width, grey):
    image, inside = object_image(height, width, seed=height, grey=grey)
    mask = foreground_mask(image)
    assert mask.dtype == bool and mask.shape == (height, width)
    overlap = (mask & inside).sum() / (mask | inside).sum()
    assert overlap > 0.8
    assert mask.mean() < 1.0


@pytest.mark.parametrize("seed", range(3))
def test_a_texture_is_foreground_everywhere(seed):
    rng = np.random.default_rng(seed)
    noise = fractal_noise(rng, 96, 96, cell=6.0)
    stripes = 0.5 + 0.4 * np.sin(np.arange(96, dtype=np.float32) / 3.0)[None, :] * np.ones((96, 1))
    for pattern in (0.5 + 0.4 * noise, stripes):
        image = np.repeat(pattern[..., None], 3, axis=2).astype(np.float32)
        assert foreground_mask(np.clip(image, 0.0, 1.0)).all()


@pytest.mark.parametrize("shape", [(1, 1), (2, 5), (64, 64)])
def test_a_flat_or_tiny_image_is_foreground_everywhere(shape):
    image = np.full((*shape, 3), 0.4, np.float32)
    assert foreground_mask(image).all()


@pytest.mark.skipif(not SHARED_MVTEC.is_dir(), reason="the shared MVTec AD data is absent")
@pytest.mark.parametrize(("category", "low", "high"), [("capsule", 0.1, 0.4), ("bottle", 0.5, 0.9)])
def test_real_objects_stand_out(category, low, high):
    for path in sorted((SHARED_MVTEC / category / "train" / "good").glob("*.png"))[:5]:
        image = cv2.resize(read_rgb(Path(path)), (128, 128), interpolation=cv2.INTER_AREA)
        fraction = foreground_mask(image.astype(np.float32) / 255.0).mean()
        assert low < fraction < high, (path, fraction)
