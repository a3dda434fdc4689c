"""Tests for anomaly.data.corruptions: mask exactness, determinism, textures, input checks."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from anomaly.data.corruptions import CHANGE_TOLERANCE, blob_mask, corrupt, scratch_mask
from anomaly.data.textures import TextureSource
from anomaly.errors import DatasetError

PROCEDURAL = TextureSource(None)


@pytest.fixture
def fake_dtd(tmp_path: Path) -> Path:
    """A tiny DTD tree: two categories of random JPGs and PNGs, plus a file that is no image."""
    rng = np.random.default_rng(123)
    for category, suffixes in (("banded", (".jpg", ".JPEG")), ("dotted", (".png", ".jpg"))):
        folder = tmp_path / "dtd" / "images" / category
        folder.mkdir(parents=True)
        for index, suffix in enumerate(suffixes):
            size = (int(rng.integers(40, 90)), int(rng.integers(40, 90)), 3)
            pixels = rng.integers(0, 256, size=size, dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{category}_{index}{suffix}")
    (tmp_path / "dtd" / "images" / "banded" / "notes.txt").write_text("not an image")
    return tmp_path / "dtd"


@pytest.fixture(params=["procedural", "dtd"])
def textures(request: pytest.FixtureRequest, fake_dtd: Path) -> TextureSource:
    return TextureSource(None if request.param == "procedural" else fake_dtd)


def texture_corruption(image: np.ndarray, rng, textures: TextureSource):
    return corrupt(image, rng, textures, texture_prob=1.0, elastic_prob=0.0)


def elastic_corruption(image: np.ndarray, rng):
    return corrupt(image, rng, TextureSource(None), texture_prob=0.0, elastic_prob=1.0)


def random_image(seed: int, height: int = 32, width: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).random((height, width, 3), dtype=np.float32)


def object_image(height: int = 48, width: int = 40) -> np.ndarray:
    """Real-looking: smooth gradient background, a dark disk, a thin bright bar, mild noise."""
    ys, xs = np.mgrid[0:height, 0:width]
    image = np.stack(
        [0.6 + 0.2 * xs / width, 0.55 + 0.2 * ys / height, np.full(xs.shape, 0.7)], axis=-1
    )
    disk = (ys - height / 2) ** 2 + (xs - width / 2) ** 2 < (min(height, width) / 3) ** 2
    image[disk] = (0.15, 0.1, 0.3)
    image[height // 3 : height // 3 + 2, 4:-4] = 0.95
    image += np.random.default_rng(7).normal(0, 0.005, image.shape)
    return np.clip(image, 0, 1).astype(np.float32)


def assert_valid_output(
    image: np.ndarray, corrupted: np.ndarray, mask: np.ndarray, expect_change: bool = True
) -> None:
    """Brute-force check of the output format and of the mask exactness contract."""
    assert corrupted.dtype == np.float32 and corrupted.shape == image.shape
    assert mask.dtype == np.float32 and mask.shape == image.shape[:2]
    assert np.isin(mask, (0.0, 1.0)).all()
    assert corrupted.min() >= 0.0 and corrupted.max() <= 1.0
    unchanged = mask == 0
    # Bit-identical, not just close: compare the raw float32 bit patterns.
    assert np.array_equal(corrupted[unchanged].view(np.uint32), image[unchanged].view(np.uint32))
    changed = ~unchanged
    for y, x in zip(*np.nonzero(changed), strict=True):
        assert max(abs(float(corrupted[y, x, c]) - float(image[y, x, c])) for c in range(3)) > (
            CHANGE_TOLERANCE
        )
    if expect_change:
        assert changed.any()


# --- TextureSource ---------------------------------------------------------------------------


def test_texture_source_missing_folder_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="does not exist"):
        TextureSource(missing)


def test_texture_source_empty_folder_raises(tmp_path: Path) -> None:
    (tmp_path / "images" / "banded").mkdir(parents=True)
    (tmp_path / "images" / "banded" / "readme.txt").write_text("no images here")
    (tmp_path / "stray.jpg").write_bytes(b"")  # outside images/<category>/, so not counted
    with pytest.raises(DatasetError, match="holds no images"):
        TextureSource(tmp_path)


def test_texture_source_lists_images_only(fake_dtd: Path) -> None:
    source = TextureSource(str(fake_dtd))
    assert len(source) == 4
    assert {path.suffix.lower() for path in source.files} == {".jpg", ".jpeg", ".png"}


@pytest.mark.parametrize(("height", "width"), [(32, 32), (24, 57), (64, 20), (1, 3)])
def test_texture_sample_format(textures: TextureSource, height: int, width: int) -> None:
    for seed in range(8):  # several seeds so every procedural kind is drawn
        texture = textures.sample(np.random.default_rng(seed), height, width)
        assert texture.shape == (height, width, 3) and texture.dtype == np.float32
        assert texture.min() >= 0.0 and texture.max() <= 1.0
        assert np.isfinite(texture).all()


def test_procedural_textures_are_varied() -> None:
    source = TextureSource(None)
    samples = [source.sample(np.random.default_rng(seed), 32, 32) for seed in range(20)]
    # Not flat, and not the same pattern every time.
    assert all(sample.std() > 0.0 for sample in samples)
    assert len({sample.tobytes() for sample in samples}) == 20


def test_texture_sample_deterministic(textures: TextureSource) -> None:
    first = textures.sample(np.random.default_rng(5), 20, 30)
    again = textures.sample(np.random.default_rng(5), 20, 30)
    other = textures.sample(np.random.default_rng(6), 20, 30)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_texture_source_pickles(textures: TextureSource) -> None:
    textures.sample(np.random.default_rng(0), 16, 16)  # fill the cache before pickling
    clone = pickle.loads(pickle.dumps(textures))
    assert clone.files == textures.files
    assert len(clone._cache) == 0
    for seed in range(4):
        expected = textures.sample(np.random.default_rng(seed), 16, 24)
        assert np.array_equal(clone.sample(np.random.default_rng(seed), 16, 24), expected)


# --- blob_mask -------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(32, 32), (40, 64), (128, 96)])
def test_blob_mask_area_and_format(height: int, width: int) -> None:
    pixels = height * width
    fractions = []
    for seed in range(30):
        mask = blob_mask(np.random.default_rng(seed), height, width)
        assert mask.dtype == bool and mask.shape == (height, width)
        count = int(mask.sum())
        assert count >= 1
        assert 0.005 * pixels - 1 <= count <= 0.25 * pixels + 1
        fractions.append(count / pixels)
    # Sizes vary: both small and large regions occur.
    assert min(fractions) < 0.03 and max(fractions) > 0.08


def test_blob_mask_is_local() -> None:
    # Blobs are compact regions, not noise sprinkled over the image: pixels scattered at random
    # would have ~4 boundary edges each, a few round blobs of 461 pixels have ~0.2-0.4.
    for seed in range(10):
        mask = blob_mask(np.random.default_rng(seed), 96, 96, min_area=0.05, max_area=0.05)
        boundary = (mask[1:, :] != mask[:-1, :]).sum() + (mask[:, 1:] != mask[:, :-1]).sum()
        assert boundary < 1.0 * mask.sum()


def test_blob_mask_deterministic() -> None:
    first = blob_mask(np.random.default_rng(1), 50, 30)
    assert np.array_equal(first, blob_mask(np.random.default_rng(1), 50, 30))
    assert not np.array_equal(first, blob_mask(np.random.default_rng(2), 50, 30))


def test_blob_mask_centres_lie_where_asked() -> None:
    # Small single blobs centred in a 6 x 6 corner square stay near it; unconstrained ones do not.
    where = np.zeros((64, 64), bool)
    where[4:10, 50:56] = True
    near = cv2.dilate(where.astype(np.uint8), np.ones((31, 31), np.uint8)).astype(bool)
    placed = [
        blob_mask(np.random.default_rng(seed), 64, 64, 0.002, 0.002, 1, where=where)
        for seed in range(40)
    ]
    assert all(mask.any() and not (mask & ~near).any() for mask in placed)
    anywhere = [blob_mask(np.random.default_rng(s), 64, 64, 0.002, 0.002, 1) for s in range(40)]
    assert sum(bool((mask & ~near).any()) for mask in anywhere) > 20


def test_corruptions_centred_on_a_region_change_pixels_near_it() -> None:
    image = np.random.default_rng(0).uniform(0.2, 0.8, (64, 64, 3)).astype(np.float32)
    where = np.zeros((64, 64), bool)
    where[40:52, 8:20] = True
    near = cv2.dilate(where.astype(np.uint8), np.ones((61, 61), np.uint8)).astype(bool)
    for seed in range(20):
        _, mask = corrupt(image, np.random.default_rng(seed), PROCEDURAL, subtle=True, where=where)
        assert mask.any() and not (mask.astype(bool) & ~near).any()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"height": 0},
        {"min_area": 0.0},
        {"min_area": 0.3, "max_area": 0.2},
        {"max_area": 1.5},
        {"max_blobs": 0},
        {"where": np.zeros((16, 16), bool)},
        {"where": np.ones((8, 16), bool)},
    ],
)
def test_blob_mask_bad_arguments(kwargs: dict) -> None:
    arguments = {"height": 16, "width": 16} | kwargs
    with pytest.raises(ValueError, match="height and width|min_area|max_blobs|where"):
        blob_mask(np.random.default_rng(0), **arguments)


# --- corruptions: mask exactness ------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_texture_corruption_exact_mask(textures: TextureSource, seed: int) -> None:
    for image in (random_image(seed), object_image()):
        corrupted, mask = texture_corruption(image, np.random.default_rng(seed), textures)
        assert_valid_output(image, corrupted, mask)


@pytest.mark.parametrize("seed", range(6))
def test_elastic_corruption_exact_mask(seed: int) -> None:
    for image in (random_image(seed), object_image()):
        corrupted, mask = elastic_corruption(image, np.random.default_rng(seed))
        assert_valid_output(image, corrupted, mask)


@pytest.mark.parametrize("seed", range(6))
def test_corrupt_exact_mask(textures: TextureSource, seed: int) -> None:
    for image in (random_image(seed), object_image()):
        corrupted, mask = corrupt(image, np.random.default_rng(seed), textures)
        assert_valid_output(image, corrupted, mask)


def test_subtle_corruptions_are_smaller_and_fainter(textures: TextureSource) -> None:
    image = object_image(64, 64)
    plain, subtle = [], []
    for seed in range(12):
        for found, flag in ((plain, False), (subtle, True)):
            corrupted, mask = corrupt(image, np.random.default_rng(seed), textures, subtle=flag)
            assert_valid_output(image, corrupted, mask)
            change = np.abs(corrupted - image).max(-1)[mask > 0]
            found.append((mask.mean(), change.mean()))
    # At most two regions (a texture and a warp), each at most 1% of the image.
    assert max(area for area, _ in subtle) <= 0.02
    assert np.mean([a for a, _ in subtle]) < np.mean([a for a, _ in plain]) / 3
    assert np.mean([c for _, c in subtle]) < np.mean([c for _, c in plain])


@pytest.mark.parametrize("seed", range(6))
def test_scratch_corruption_exact_mask(textures: TextureSource, seed: int) -> None:
    for image in (random_image(seed), object_image()):
        rng = np.random.default_rng(seed)
        corrupted, mask = corrupt(image, rng, textures, scratch_prob=1.0)
        assert_valid_output(image, corrupted, mask)


def test_scratches_are_thin_lines() -> None:
    # Long and thin: the mask's area is small against its extent, and an opening with a 5 x 5
    # square (which keeps any blob 5 pixels wide) removes nearly all of it.
    for seed in range(20):
        mask = scratch_mask(np.random.default_rng(seed), 128, 128)
        assert mask.any() and mask.mean() < 0.03
        opened = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
        assert opened.sum() <= 0.1 * mask.sum()
        ys, xs = np.nonzero(mask)
        assert max(np.ptp(ys), np.ptp(xs)) >= 0.04 * 128


def test_scratches_stay_where_asked() -> None:
    where = np.zeros((64, 64), bool)
    where[20:44, 10:54] = True
    for seed in range(20):
        mask = scratch_mask(np.random.default_rng(seed), 64, 64, where=where)
        assert mask.any() and not (mask & ~where).any()
    outside = [scratch_mask(np.random.default_rng(s), 64, 64) & ~where for s in range(20)]
    assert sum(bool(m.any()) for m in outside) > 5


def test_scratch_prob_zero_keeps_the_blob_corruptions(textures: TextureSource) -> None:
    # Runs without scratches draw exactly what they drew before the option existed.
    image = object_image(64, 64)
    for seed in range(4):
        before = corrupt(image, np.random.default_rng(seed), textures)
        after = corrupt(image, np.random.default_rng(seed), textures, scratch_prob=0.0)
        assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_corrupt_both_corruptions_exact_mask(textures: TextureSource) -> None:
    image = object_image(64, 64)
    for seed in range(4):
        rng = np.random.default_rng(seed)
        corrupted, mask = corrupt(image, rng, textures, texture_prob=1.0, elastic_prob=1.0)
        assert_valid_output(image, corrupted, mask)


def test_corrupt_extreme_values_stay_exact(textures: TextureSource) -> None:
    # Saturated pixels are where clipping could silently undo a change.
    image = np.zeros((32, 32, 3), np.float32)
    image[:, 16:] = 1.0
    for seed in range(4):
        corrupted, mask = corrupt(image, np.random.default_rng(seed), textures)
        assert_valid_output(image, corrupted, mask)


def test_elastic_changes_only_local_structure() -> None:
    # A warp moves existing pixels around, so it cannot invent colours far outside the image's.
    image = object_image(64, 64)
    for seed in range(4):
        corrupted, mask = elastic_corruption(image, np.random.default_rng(seed))
        assert_valid_output(image, corrupted, mask)
        assert (corrupted.min(axis=(0, 1)) >= image.min(axis=(0, 1)) - 1e-6).all()
        assert (corrupted.max(axis=(0, 1)) <= image.max(axis=(0, 1)) + 1e-6).all()


def test_elastic_on_flat_image_changes_nothing() -> None:
    image = np.full((32, 32, 3), 0.4, np.float32)
    corrupted, mask = elastic_corruption(image, np.random.default_rng(0))
    assert_valid_output(image, corrupted, mask, expect_change=False)
    assert not mask.any()


def test_corrupt_texture_only_on_flat_image_changes_something(textures: TextureSource) -> None:
    image = np.full((32, 32, 3), 0.4, np.float32)
    rng = np.random.default_rng(0)
    corrupted, mask = corrupt(image, rng, textures, texture_prob=1.0, elastic_prob=0.0)
    assert_valid_output(image, corrupted, mask)


def test_corrupt_probability_zero_is_identity(textures: TextureSource) -> None:
    image = random_image(0)
    rng = np.random.default_rng(0)
    corrupted, mask = corrupt(image, rng, textures, texture_prob=0.0, elastic_prob=0.0)
    assert np.array_equal(corrupted, image) and corrupted is not image
    assert mask.dtype == np.float32 and mask.shape == image.shape[:2] and not mask.any()


def test_corrupt_always_corrupts_with_small_probabilities(textures: TextureSource) -> None:
    image = object_image()
    for seed in range(5):
        rng = np.random.default_rng(seed)
        corrupted, mask = corrupt(image, rng, textures, texture_prob=0.05, elastic_prob=0.05)
        assert_valid_output(image, corrupted, mask)


# --- determinism ----------------------------------------------------------------------------


@pytest.mark.parametrize("function", ["texture", "elastic", "corrupt"])
def test_determinism(fake_dtd: Path, function: str) -> None:
    textures = TextureSource(fake_dtd)
    image = object_image()

    def run(seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        if function == "texture":
            return texture_corruption(image, rng, textures)
        if function == "elastic":
            return elastic_corruption(image, rng)
        return corrupt(image, rng, textures)

    corrupted, mask = run(11)
    again, again_mask = run(11)
    assert np.array_equal(corrupted, again) and np.array_equal(mask, again_mask)
    other, other_mask = run(12)
    assert not np.array_equal(corrupted, other)
    assert not np.array_equal(mask, other_mask)


# --- input checks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((8, 8), np.float32), "shape"),
        (np.zeros((8, 8, 4), np.float32), "shape"),
        (np.zeros((8, 8, 3), np.float64), "float32"),
        (np.full((8, 8, 3), 1.5, np.float32), r"\[0, 1\]"),
        (np.full((8, 8, 3), np.nan, np.float32), r"\[0, 1\]"),
    ],
)
def test_bad_images_raise(image: np.ndarray, message: str) -> None:
    textures = TextureSource(None)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=message):
        corrupt(image, rng, textures)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"texture_prob": -0.1},
        {"elastic_prob": 1.5},
        {"texture_prob": float("nan")},
        {"scratch_prob": 1.1},
    ],
)
def test_bad_probabilities_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="prob"):
        corrupt(random_image(0), np.random.default_rng(0), TextureSource(None), **kwargs)
