"""Tests of the built-in synthetic capsule dataset and the naive baseline that it must defeat."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly.data import synthetic
from anomaly.data.capsule import DEFECT_TYPES, render_pair, render_sample
from anomaly.data.synthetic import ensure_generated, generate

MVTEC_CAPSULE_COUNTS = {
    "train/good": 219,
    "test/good": 23,
    "test/crack": 23,
    "test/faulty_imprint": 22,
    "test/poke": 21,
    "test/scratch": 23,
    "test/squeeze": 20,
}


def render_normal(rng: np.random.Generator, size: int) -> np.ndarray:
    return render_sample(rng, size, None)[0]


SMALL_COUNTS = {(split, name): 2 for split, name in synthetic.SPLIT_COUNTS}


@pytest.fixture
def small_counts(monkeypatch):
    monkeypatch.setattr(synthetic, "SPLIT_COUNTS", dict(SMALL_COUNTS))


@pytest.fixture(scope="module")
def full_set(tmp_path_factory) -> Path:
    """The complete set with the real counts, at a tiny size."""
    return generate(tmp_path_factory.mktemp("full"), size=32)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_same_seed_gives_byte_identical_files_and_other_seed_differs(tmp_path, small_counts):
    first = _files(generate(tmp_path / "a", seed=3, size=32))
    second = _files(generate(tmp_path / "b", seed=3, size=32))
    other = _files(generate(tmp_path / "c", seed=4, size=32))
    assert len(first) == 2 * 7 + 2 * 5 + 1  # images, masks, marker
    assert first == second
    assert first.keys() == other.keys()
    pngs = [name for name in first if name.endswith(".png")]
    assert all(first[name] != other[name] for name in pngs)


def test_layout_and_counts_match_mvtec_capsule(full_set):
    assert full_set.name == "capsule"
    for folder, count in MVTEC_CAPSULE_COUNTS.items():
        names = sorted(p.name for p in (full_set / folder).iterdir())
        assert names == [f"{k:03d}.png" for k in range(count)]
    for defect in DEFECT_TYPES:
        masks = sorted(p.name for p in (full_set / "ground_truth" / defect).iterdir())
        assert masks == [f"{k:03d}_mask.png" for k in range(MVTEC_CAPSULE_COUNTS[f"test/{defect}"])]
    assert sorted(p.name for p in (full_set / "ground_truth").iterdir()) == sorted(DEFECT_TYPES)
    assert sorted(p.name for p in (full_set / "test").iterdir()) == sorted(("good", *DEFECT_TYPES))
    marker = json.loads((full_set / synthetic.MARKER_NAME).read_text())
    assert (marker["seed"], marker["size"]) == (0, 32)


def test_every_mask_is_binary_nonempty_and_matches_its_image(full_set):
    image = Image.open(full_set / "train" / "good" / "000.png")
    assert (image.mode, image.size) == ("RGB", (32, 32))
    for defect in DEFECT_TYPES:
        for image_path in sorted((full_set / "test" / defect).glob("*.png")):
            image = Image.open(image_path)
            mask = Image.open(full_set / "ground_truth" / defect / f"{image_path.stem}_mask.png")
            assert (image.mode, mask.mode) == ("RGB", "L")
            assert mask.size == image.size
            values = np.unique(np.asarray(mask))
            assert set(values.tolist()) == {0, 255}, image_path


def test_written_files_follow_the_documented_seeding(full_set):
    # Class index 4 in ("good", *DEFECT_TYPES) is "scratch"; split index 1 is "test".
    rng = np.random.default_rng([0, 1, 4, 7])
    image, mask = render_sample(rng, 32, "scratch")
    assert np.array_equal(np.asarray(Image.open(full_set / "test/scratch/007.png")), image)
    written = np.asarray(Image.open(full_set / "ground_truth/scratch/007_mask.png"))
    assert np.array_equal(written, mask.astype(np.uint8) * 255)


@pytest.mark.parametrize("defect", DEFECT_TYPES)
@pytest.mark.parametrize("size", [32, 64])
def test_mask_is_exactly_what_the_defect_changed(defect, size):
    for index in range(3):
        image, twin, mask = render_pair(np.random.default_rng([index, size]), size, defect)
        assert image.shape == twin.shape == (size, size, 3)
        assert image.dtype == twin.dtype == np.uint8
        assert mask.shape == (size, size) and mask.dtype == bool
        brute_force = np.zeros((size, size), dtype=bool)
        for row in range(size):
            for col in range(size):
                brute_force[row, col] = any(
                    image[row, col, c] != twin[row, col, c] for c in range(3)
                )
        assert np.array_equal(mask, brute_force)
        assert mask.any()
        # The twin is the very image the same generator state gives without a defect.
        assert np.array_equal(twin, render_normal(np.random.default_rng([index, size]), size))


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_defects_are_small(defect):
    fractions = [
        render_sample(np.random.default_rng([9, k]), 64, defect)[1].mean() for k in range(4)
    ]
    assert all(0.0005 < f < 0.03 for f in fractions), fractions


def test_normal_image_shows_a_two_colour_capsule_on_a_light_background():
    image = render_normal(np.random.default_rng(0), 64).astype(float)
    corners = np.concatenate([image[:6, :6], image[-6:, -6:]]).reshape(-1, 3)
    assert corners.min() > 150  # light, plain background
    left, right = image[30:34, 14:18].mean(axis=(0, 1)), image[30:34, 52:55].mean(axis=(0, 1))
    assert right[0] > right[2] + 60  # orange-brown half
    assert left.min() > 150 and abs(left[0] - left[2]) < 60  # cream half
    # Lit from above: the upper body is brighter than the lower body.
    assert image[27, 20:28].mean() > image[37, 20:28].mean()
    normal_again = render_sample(np.random.default_rng(0), 64)
    assert np.array_equal(normal_again[0], image.astype(np.uint8)) and not normal_again[1].any()


def test_nuisance_varies_between_normal_images():
    first = render_normal(np.random.default_rng(1), 32).astype(int)
    second = render_normal(np.random.default_rng(2), 32).astype(int)
    assert np.abs(first - second).mean() > 1.0


def test_ensure_generated_reuses_a_matching_set(tmp_path, small_counts):
    target = ensure_generated(tmp_path, seed=1, size=32)
    sentinel = target / "sentinel"
    sentinel.write_text("kept")
    assert ensure_generated(tmp_path, seed=1, size=32) == target
    assert sentinel.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["capsule"]  # no temporary leftovers


@pytest.mark.parametrize("change", [{"seed": 2}, {"size": 40}])
def test_ensure_generated_replaces_a_set_made_with_other_parameters(tmp_path, small_counts, change):
    target = ensure_generated(tmp_path, seed=1, size=32)
    (target / "sentinel").write_text("stale")
    before = (target / "train/good/000.png").read_bytes()
    params = {"seed": 1, "size": 32, **change}
    assert ensure_generated(tmp_path, **params) == target
    assert not (target / "sentinel").exists()
    assert (target / "train/good/000.png").read_bytes() != before
    assert Image.open(target / "train/good/000.png").size == (params["size"],) * 2
    assert json.loads((target / synthetic.MARKER_NAME).read_text())["seed"] == params["seed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["capsule"]


def test_interrupted_generation_leaves_no_dataset_behind(tmp_path, small_counts, monkeypatch):
    calls = []

    def failing_render(rng, size, defect=None):
        calls.append(defect)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return render_pair(rng, size, defect)[::2]

    monkeypatch.setattr(synthetic, "render_sample", failing_render)
    with pytest.raises(KeyboardInterrupt):
        ensure_generated(tmp_path, size=32)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_regeneration_keeps_the_old_set(tmp_path, small_counts, monkeypatch):
    target = ensure_generated(tmp_path, seed=1, size=32)
    before = _files(target)

    def failing_render(rng, size, defect=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "render_sample", failing_render)
    with pytest.raises(KeyboardInterrupt):
        ensure_generated(tmp_path, seed=2, size=32)
    assert _files(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["capsule"]


def test_ensure_generated_never_replaces_a_foreign_folder(tmp_path):
    (tmp_path / "capsule" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="not a synthetic set"):
        ensure_generated(tmp_path, size=32)
    assert (tmp_path / "capsule" / "train").is_dir()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: render_sample(np.random.default_rng(0), 32, "dent"), "unknown defect"),
        (lambda: render_normal(np.random.default_rng(0), 8), "size must be"),
        (lambda: render_normal(np.random.default_rng(0), 32.0), "size must be"),
        (lambda: generate(Path("unused"), seed=-1, size=32), "seed must be"),
        (lambda: generate(Path("unused"), category="a/b", size=32), "category must be"),
        (lambda: ensure_generated(Path("unused"), category="..", size=32), "category must be"),
    ],
)
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_generate_refuses_an_existing_folder(tmp_path):
    (tmp_path / "capsule").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        generate(tmp_path, size=32)


def test_naive_baseline_does_not_solve_the_synthetic_set(full_set):
    from benchmarks.naive_baseline import evaluate

    result = evaluate(full_set.parent, full_set.name, 32)
    assert (result["n_test"], result["n_anomalous"]) == (132, 109)
    assert result["image_auroc"] < 0.8
    # The mean-image distance still points roughly at the defects.
    assert result["pixel_auroc"] > 0.6
