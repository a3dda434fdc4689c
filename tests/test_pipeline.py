"""`ImagePipeline`: the resize inside it is training's, and it scores as the detector does."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from anomaly.bench import model_config
from anomaly.data.images import resize_rgb
from anomaly.pipeline import ImagePipeline, area_resize
from anomaly.tasks import build_detector


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def resized(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """area_resize of one image, back as uint8 (h, w, 3)."""
    levels = area_resize(torch.from_numpy(image)[None], size)[0]
    assert levels.dtype == torch.float32 and (levels == levels.round()).all()
    return levels.permute(1, 2, 0).numpy().astype(np.uint8)


@pytest.mark.parametrize(
    ("shape", "size"),
    [
        ((32, 32), (32, 32)),  # kept
        ((64, 64), (32, 32)),  # 2 x 2: OpenCV rounds halves up
        ((128, 96), (32, 32)),  # 4 x 3: halves to even
        ((64, 32), (32, 32)),  # 2 x 1
        ((40, 90), (20, 30)),
        ((1024, 768), (256, 256)),
    ],
)
def test_shrinking_by_whole_factors_is_exactly_trainings_resize(shape, size):
    image = random_image(*shape)
    np.testing.assert_array_equal(resized(image, size), resize_rgb(image, size))


@pytest.mark.parametrize(
    ("shape", "size"), [((70, 50), (32, 32)), ((300, 421), (128, 128)), ((20, 30), (32, 32))]
)
def test_other_sizes_are_within_one_level_of_trainings_resize(shape, size):
    image = random_image(*shape, seed=1)
    difference = np.abs(resized(image, size).astype(int) - resize_rgb(image, size).astype(int))
    assert difference.max() <= 1 and difference.mean() < 0.1


def exact_area_means(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Each output pixel's mean over the input area it covers, in exact fractions (h, w, 3)."""

    def overlaps(size_in: int, size_out: int) -> np.ndarray:
        scale = Fraction(size_in, size_out)
        return np.array(
            [
                [max(0, min((i + 1) * scale, j + 1) - max(i * scale, j)) for j in range(size_in)]
                for i in range(size_out)
            ],
            dtype=object,
        )

    rows, columns = overlaps(image.shape[0], size[0]), overlaps(image.shape[1], size[1])
    area = Fraction(image.shape[0] * image.shape[1], size[0] * size[1])
    levels = image.astype(object)
    return np.stack([rows @ levels[..., c] @ columns.T / area for c in range(3)], axis=2)


@pytest.mark.parametrize(
    ("shape", "size"), [((48, 36), (32, 24)), ((45, 70), (32, 32)), ((20, 30), (32, 32))]
)
def test_means_are_exact_and_rounded_as_opencv_rounds(shape, size):
    image = random_image(*shape, seed=2)
    means = exact_area_means(image, size)
    # Round half to even (a 2 x 2 reduction would round halves up).
    expected = np.vectorize(lambda m: round(m))(means).astype(np.uint8)
    np.testing.assert_array_equal(resized(image, size), expected)


def test_a_flat_image_stays_flat_at_any_size():
    for shape in [(33, 47), (10, 12), (256, 256)]:
        image = np.full((*shape, 3), 77, dtype=np.uint8)
        assert (resized(image, (32, 32)) == 77).all()


@pytest.mark.parametrize("name", ["sdc_ccm", "residual_ae"])
def test_the_pipeline_scores_as_the_detector_scores_trainings_inputs(name):
    torch.manual_seed(0)
    detector = build_detector(model_config(name)).eval()
    detector.set_normal_statistics(torch.rand(32, 32), torch.rand(32, 32) + 0.5)
    detector.set_threshold(1.0, 0.4)
    images = np.stack([random_image(64, 64, seed) for seed in range(3)])
    with torch.inference_mode():
        maps, scores, normalized, anomalous = ImagePipeline(detector, (32, 32))(
            torch.from_numpy(images)
        )
        inputs = np.stack([resize_rgb(image, (32, 32)) for image in images])
        inputs = torch.from_numpy(inputs.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
        inputs = inputs.contiguous()  # as the loaders collate them
        expected_maps, expected_scores, _ = detector(inputs)
    torch.testing.assert_close(maps, expected_maps, rtol=0, atol=0)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=0)
    torch.testing.assert_close(normalized, detector.normalized_score(expected_scores))
    assert anomalous.tolist() == (expected_scores.double() >= 1.0).tolist()
