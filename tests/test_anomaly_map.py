"""The anomaly map and score: shapes, smoothing and scoring against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from anomaly.anomaly_map import AnomalyScorer


def test_shapes_and_score_is_the_map_maximum():
    torch.manual_seed(0)
    image, reconstruction = torch.rand(3, 3, 40, 56), torch.rand(3, 3, 40, 56)
    maps, scores = AnomalyScorer(sigma=2.0)(image, reconstruction)
    assert maps.shape == (3, 40, 56) and scores.shape == (3,)
    assert torch.equal(scores, maps.flatten(1).amax(1))


def test_l2_map_matches_scipy_gaussian_filter():
    torch.manual_seed(1)
    image, reconstruction = torch.rand(2, 3, 48, 48), torch.rand(2, 3, 48, 48)
    maps, _ = AnomalyScorer(l2_weight=1.0, sigma=3.0)(image, reconstruction)
    error = ((image - reconstruction) ** 2).mean(1).numpy()
    expected = np.stack([ndimage.gaussian_filter(e, 3.0, mode="mirror") for e in error])
    assert np.allclose(maps.numpy(), expected, atol=1e-5)


def test_top_k_score_is_the_mean_of_the_largest_pixels():
    torch.manual_seed(2)
    image, reconstruction = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    maps, scores = AnomalyScorer(sigma=0, top_k=10)(image, reconstruction)
    expected = torch.sort(maps.flatten(1), dim=1, descending=True).values[:, :10].mean(1)
    assert torch.allclose(scores, expected)


def test_perfect_reconstruction_gives_zero_map_for_every_term():
    image = torch.rand(2, 3, 32, 32)
    maps, scores = AnomalyScorer(1.0, 1.0, 1.0, sigma=4.0)(image, image.clone())
    assert maps.abs().max() < 1e-5 and scores.abs().max() < 1e-5


def test_a_local_defect_scores_highest_where_it_is():
    image = torch.full((1, 3, 64, 64), 0.5)
    reconstruction = image.clone()
    reconstruction[..., 40:46, 10:16] = 0.9
    for scorer in (AnomalyScorer(1, 0, 0), AnomalyScorer(0, 1, 0), AnomalyScorer(0, 0, 1)):
        maps, _ = scorer(image, reconstruction)
        row, col = divmod(int(maps[0].argmax()), 64)
        assert 38 <= row <= 48 and 8 <= col <= 18


def test_bad_weights_raise():
    with pytest.raises(ValueError, match="not all zero"):
        AnomalyScorer(0, 0, 0)
    with pytest.raises(ValueError, match="top_k"):
        AnomalyScorer(top_k=0)
