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


def fitted_scorer(normal_maps: torch.Tensor, **kwargs) -> AnomalyScorer:
    scorer = AnomalyScorer(sigma=0, standardize_score=True, **kwargs)
    maps = normal_maps.double()
    scorer.fit_normal_statistics(
        torch.tensor(float(len(maps))), maps.sum(0).float(), maps.pow(2).sum(0).float()
    )
    return scorer


def test_standardized_score_uses_normal_statistics_and_keeps_the_raw_map():
    torch.manual_seed(3)
    normal_maps = torch.rand(20, 8, 8)
    scorer = fitted_scorer(normal_maps)
    std = normal_maps.double().std(0, unbiased=False).float()
    assert torch.allclose(scorer.normal_mean, normal_maps.mean(0), atol=1e-6)
    assert torch.allclose(scorer.normal_std, std + std.mean(), atol=1e-5)
    image, reconstruction = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    maps, scores = scorer(image, reconstruction)
    raw_maps, _ = AnomalyScorer(sigma=0)(image, reconstruction)
    assert torch.equal(maps, raw_maps)
    expected = ((raw_maps - normal_maps.mean(0)) / (std + std.mean())).flatten(1).amax(1)
    assert torch.allclose(scores, expected, atol=1e-4)


def test_normal_statistics_travel_in_the_state_dict_and_must_match_the_size():
    scorer = fitted_scorer(torch.rand(5, 8, 8))
    fresh = AnomalyScorer(sigma=0, standardize_score=True)
    assert not fresh.has_normal_statistics
    fresh.load_state_dict(scorer.state_dict())
    assert torch.equal(fresh.normal_mean, scorer.normal_mean)
    with pytest.raises(ValueError, match="fitted at"):
        fresh(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16))
