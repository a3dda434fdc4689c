"""The anomaly map, the detector's score and its normal statistics, against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy import ndimage
from scipy.stats import mannwhitneyu
from torch import nn

from anomaly.anomaly_map import AnomalyMap
from anomaly.detector import AnomalyDetector, NormalMapStatistics
from anomaly.errors import ConfigError
from anomaly.tasks import build_detector


class Shift(nn.Module):
    """A stand-in network: the input plus a fixed offset (so errors are known)."""

    def __init__(self, offset: torch.Tensor) -> None:
        super().__init__()
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.offset


def test_detector_returns_map_score_and_reconstruction_and_scores_the_map_maximum():
    torch.manual_seed(0)
    images, offset = torch.rand(3, 3, 40, 56), torch.rand(3, 3, 40, 56)
    detector = AnomalyDetector(Shift(offset), AnomalyMap(sigma=2.0))
    maps, scores, reconstruction = detector(images)
    assert maps.shape == (3, 40, 56) and scores.shape == (3,)
    assert torch.equal(reconstruction, images + offset)
    assert torch.equal(maps, AnomalyMap(sigma=2.0)(images, images + offset))
    assert torch.equal(scores, maps.flatten(1).amax(1))


def test_l2_map_matches_scipy_gaussian_filter():
    torch.manual_seed(1)
    image, reconstruction = torch.rand(2, 3, 48, 48), torch.rand(2, 3, 48, 48)
    maps = AnomalyMap(l2=1.0, sigma=3.0)(image, reconstruction)
    error = ((image - reconstruction) ** 2).mean(1).numpy()
    expected = np.stack([ndimage.gaussian_filter(e, 3.0, mode="mirror") for e in error])
    assert np.allclose(maps.numpy(), expected, atol=1e-5)


def test_top_k_score_is_the_mean_of_the_largest_pixels():
    maps = torch.rand(2, 16, 16)
    detector = AnomalyDetector(nn.Identity(), AnomalyMap(sigma=0), top_k=10)
    expected = torch.sort(maps.flatten(1), dim=1, descending=True).values[:, :10].mean(1)
    assert torch.allclose(detector.score(maps), expected)


def test_top_share_score_is_the_mean_of_that_share_of_the_largest_pixels():
    maps = torch.rand(2, 20, 16)
    detector = AnomalyDetector(nn.Identity(), AnomalyMap(sigma=0), top_share=0.05)
    # 5% of 320 pixels: the 16 largest.
    expected = torch.sort(maps.flatten(1), dim=1, descending=True).values[:, :16].mean(1)
    assert torch.allclose(detector.score(maps), expected)
    # At least one pixel: a tiny share scores the maximum.
    tiny = AnomalyDetector(nn.Identity(), AnomalyMap(sigma=0), top_share=1e-6)
    assert torch.equal(tiny.score(maps), maps.flatten(1).amax(1))


def test_perfect_reconstruction_gives_zero_map_for_every_term():
    image = torch.rand(2, 3, 32, 32)
    maps = AnomalyMap(sigma=4.0, l2=1.0, l1=1.0, ssim=1.0, gradient=1.0)(image, image.clone())
    assert maps.abs().max() < 1e-5


def test_a_local_defect_scores_highest_where_it_is():
    image = torch.full((1, 3, 64, 64), 0.5)
    reconstruction = image.clone()
    reconstruction[..., 40:46, 10:16] = 0.9
    for term in ("l2", "l1", "ssim", "gradient"):
        maps = AnomalyMap(**{"l2": 0.0, term: 1.0})(image, reconstruction)
        row, col = divmod(int(maps[0].argmax()), 64)
        assert 38 <= row <= 48 and 8 <= col <= 18


def test_bad_settings_raise_config_errors():
    with pytest.raises(ConfigError, match="at least one"):
        AnomalyMap(l2=0.0)
    for sigma in (-1.0, "2", True, float("nan")):
        with pytest.raises(ConfigError, match="anomaly map sigma"):
            AnomalyMap(sigma=sigma)
    for side in (0, -64.0, "128", None):
        with pytest.raises(ConfigError, match="side_per_sigma"):
            AnomalyMap(side_per_sigma=side)
    with pytest.raises(ConfigError, match="top_k"):
        AnomalyDetector(nn.Identity(), AnomalyMap(), top_k=0)
    for share in (0.0, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="score.top_share"):
            AnomalyDetector(nn.Identity(), AnomalyMap(), top_share=share)
    with pytest.raises(ConfigError, match="not both"):
        AnomalyDetector(nn.Identity(), AnomalyMap(), top_k=5, top_share=0.1)


def fitted_detector(normal_maps: torch.Tensor) -> AnomalyDetector:
    detector = AnomalyDetector(nn.Identity(), AnomalyMap(sigma=0), standardize=True)
    statistics = NormalMapStatistics()
    for part in normal_maps.split(7):  # several updates, as over validation batches
        statistics.update(part)
    detector.set_normal_statistics(*statistics.compute())
    return detector


def test_normal_statistics_are_the_mean_and_the_floored_spread_of_the_maps():
    torch.manual_seed(3)
    normal_maps = torch.rand(20, 8, 8)
    detector = fitted_detector(normal_maps)
    std = normal_maps.double().std(0, unbiased=False).float()
    assert torch.allclose(detector.normal_mean, normal_maps.mean(0), atol=1e-6)
    assert torch.allclose(detector.normal_std, std + std.mean(), atol=1e-5)


def test_standardized_score_uses_normal_statistics_and_keeps_the_raw_map():
    torch.manual_seed(3)
    normal_maps = torch.rand(20, 8, 8)
    detector = fitted_detector(normal_maps)
    images = torch.rand(4, 3, 8, 8)
    maps, scores, _ = detector(images)
    assert torch.equal(maps, AnomalyMap(sigma=0)(images, images))
    std = normal_maps.double().std(0, unbiased=False).float()
    expected = ((maps - normal_maps.mean(0)) / (std + std.mean())).flatten(1).amax(1)
    assert torch.allclose(scores, expected, atol=1e-4)


def test_normal_statistics_travel_in_the_state_dict_and_must_match_the_size():
    detector = fitted_detector(torch.rand(5, 8, 8))
    fresh = AnomalyDetector(nn.Identity(), AnomalyMap(sigma=0), standardize=True)
    assert not fresh.has_normal_statistics
    fresh.load_state_dict(detector.state_dict())
    assert torch.equal(fresh.normal_mean, detector.normal_mean)
    with pytest.raises(ConfigError, match="fitted at"):
        fresh.score(torch.rand(1, 16, 16))


def test_normal_statistics_are_finite_for_identical_maps_and_refuse_a_single_map():
    identical = torch.full((3, 8, 8), 0.25)
    detector = fitted_detector(identical)
    assert torch.isfinite(detector.normal_std).all() and (detector.normal_std > 0).all()
    scores = detector.score(torch.rand(4, 8, 8))
    assert torch.isfinite(scores).all()
    statistics = NormalMapStatistics()
    statistics.update(torch.rand(1, 8, 8))
    with pytest.raises(ValueError, match="at least 2 normal maps, got 1"):
        statistics.compute()


def test_sigma_none_follows_the_shorter_side_of_the_image():
    torch.manual_seed(0)
    for shape, sigma in (((64, 64), 0.5), ((128, 96), 0.75), ((256, 256), 2.0)):
        image = torch.rand(2, 3, *shape)
        reconstruction = image + 0.1 * torch.randn_like(image)
        following = AnomalyMap(sigma=None, l2=1.0)(image, reconstruction)
        fixed = AnomalyMap(sigma=sigma, l2=1.0)(image, reconstruction)
        assert torch.allclose(following, fixed, atol=1e-7), shape
        assert AnomalyMap(sigma=None).sigma_for(*shape) == sigma
        assert AnomalyMap(sigma=None, side_per_sigma=64).sigma_for(*shape) == 2 * sigma


def test_checkpoints_from_before_the_smoothing_setting_keep_their_smoothing():
    """A model config without `side_per_sigma` (runs before it existed) builds the map those
    runs were calibrated with: 1/64 of the shorter side; today's config gives 1/128."""
    model = OmegaConf.create(
        {
            "net": {"_target_": "torch.nn.Identity"},
            "anomaly_map": {"l2": 10.0, "ssim": 1.0, "sigma": None},
            "score": {"top_k": None, "standardize": False},
        }
    )
    assert build_detector(model).anomaly_map.sigma_for(128, 128) == 2.0
    model.anomaly_map.side_per_sigma = 128
    assert build_detector(model).anomaly_map.sigma_for(128, 128) == 1.0


def auto_detector(standardize="auto") -> AnomalyDetector:
    return AnomalyDetector(nn.Identity(), AnomalyMap(sigma=0), standardize=standardize)


def aligned_maps(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps whose left column is always bright and noisy (an edge hard to reconstruct) and
    anomalies that are a fainter spot in the quiet centre: only per-pixel statistics find them."""
    maps = 0.02 * torch.rand(40, 8, 8, generator=generator)
    maps[:, :, 0] += 0.5 + 0.3 * torch.rand(40, 8, generator=generator)
    labels = (torch.arange(40) >= 24).long()
    maps[labels == 1, 4, 4] += 0.3
    return maps, labels


def test_auto_standardizes_where_per_pixel_statistics_rank_the_anomalies_better():
    maps, labels = aligned_maps(torch.Generator().manual_seed(0))
    detector = auto_detector()
    detector.set_normal_statistics(torch.zeros(8, 8), torch.ones(8, 8))
    assert not detector.scores_standardized
    assert detector.choose_standardization(maps, labels) is True
    assert detector.scores_standardized and bool(detector.standardized)


def rank_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUROC as the Mann-Whitney U statistic of the anomalous scores over the normal ones."""
    anomalous, normal = scores[labels == 1], scores[labels == 0]
    u = mannwhitneyu(anomalous, normal, alternative="greater").statistic
    return u / (len(anomalous) * len(normal))


def test_the_comparison_scores_each_normal_by_the_other_normals_statistics():
    maps, labels = aligned_maps(torch.Generator().manual_seed(3))
    raw, standardized = auto_detector().compare_standardization(maps, labels)
    # Written out with numpy and scipy: each normal standardized by the other normals' mean and
    # spread (the deviation plus its own mean), each anomaly by every normal's.
    values, classes = maps.double().numpy(), labels.numpy()

    def standardized_max(value: np.ndarray, fit: np.ndarray) -> float:
        spread = fit.std(0) + fit.std(0).mean()
        return float(((value - fit.mean(0)) / spread).max())

    normals = np.flatnonzero(classes == 0)
    scores = [
        standardized_max(values[i], values[normals[normals != i]])
        if classes[i] == 0
        else standardized_max(values[i], values[normals])
        for i in range(len(values))
    ]
    assert raw == pytest.approx(rank_auroc(classes, values.reshape(40, -1).max(1)), abs=1e-9)
    assert standardized == pytest.approx(rank_auroc(classes, np.array(scores)), abs=1e-6)
    assert standardized > raw  # the anomalies hide below the noisy edge column
    assert auto_detector().compare_standardization(maps[:3], labels[:3]) is None


def test_auto_keeps_the_raw_map_for_unaligned_objects():
    # One bright pixel per map at a random place; anomalies are brighter. The raw maximum ranks
    # them perfectly, statistics of other maps' random places cannot do better.
    generator = torch.Generator().manual_seed(0)
    maps = 0.01 * torch.rand(40, 8, 8, generator=generator)
    labels = (torch.arange(40) % 3 == 0).long()
    places = torch.randint(0, 64, (40,), generator=generator)
    maps.view(40, -1)[torch.arange(40), places] = torch.where(labels == 1, 0.9, 0.5)
    detector = auto_detector()
    detector.set_normal_statistics(torch.zeros(8, 8), torch.ones(8, 8))
    assert detector.choose_standardization(maps, labels) is False
    assert not detector.scores_standardized
    assert torch.equal(detector.score(maps), maps.flatten(1).amax(1))


def test_the_choice_is_fixed_unless_auto_and_travels_in_the_state_dict():
    maps, labels = aligned_maps(torch.Generator().manual_seed(1))
    for fixed in (True, False):
        detector = auto_detector(fixed)
        detector.set_normal_statistics(torch.zeros(8, 8), torch.ones(8, 8))
        assert detector.choose_standardization(maps, labels) is fixed
    chosen = auto_detector()
    chosen.set_normal_statistics(torch.zeros(8, 8), torch.ones(8, 8))
    chosen.choose_standardization(maps, labels)
    loaded = auto_detector()
    loaded.load_state_dict(chosen.state_dict())
    assert loaded.scores_standardized
    # A checkpoint from before the choice existed standardizes as its config says.
    old = {k: v for k, v in chosen.state_dict().items() if k != "standardized"}
    for fixed in (True, False):
        detector = auto_detector(fixed)
        detector.load_state_dict(old)
        assert detector.scores_standardized is fixed
    with pytest.raises(ConfigError, match="true, false or auto"):
        auto_detector("sometimes")


def test_auto_stays_raw_with_too_few_normals_or_one_class():
    maps, labels = aligned_maps(torch.Generator().manual_seed(2))
    detector = auto_detector()
    detector.set_normal_statistics(torch.zeros(8, 8), torch.ones(8, 8))
    assert detector.choose_standardization(maps[:3], torch.zeros(3, dtype=torch.long)) is False
    assert detector.choose_standardization(maps[labels == 0], labels[labels == 0]) is False
    few = torch.tensor([0, 0, 1, 1, 1, 1])
    assert detector.choose_standardization(maps[20:26], few) is False


def test_matched_levels_make_the_map_independent_of_gain_and_offset():
    # Levels in [0.3, 0.7]: times 0.9 or 1.1, and shifted by 0.05, nothing is clipped.
    torch.manual_seed(2)
    images = 0.3 + 0.4 * torch.rand(2, 3, 32, 32)
    net = nn.Conv2d(3, 3, 3, padding=1)
    detector = AnomalyDetector(net, AnomalyMap(sigma=1.0), normalize_levels=True)
    detector.set_reference_levels(0.6, 0.1)
    with torch.no_grad():
        maps, scores, _ = detector(images)
        for gain, offset in ((0.9, 0.0), (1.1, 0.0), (1.0, 0.05), (0.8, 0.1)):
            shifted_maps, shifted_scores, _ = detector(images * gain + offset)
            assert torch.allclose(shifted_maps, maps, atol=1e-5)
            assert torch.allclose(shifted_scores, scores, atol=1e-5)
    # The network sees the reference levels: mean 0.6 and spread 0.1 for every image.
    matched, gain, offset = detector.match_levels(images)
    flat = matched.flatten(1)
    assert torch.allclose(flat.mean(1), torch.tensor([0.6, 0.6]), atol=1e-5)
    assert torch.allclose(flat.std(1, correction=0), torch.tensor([0.1, 0.1]), atol=1e-5)
    assert torch.allclose(matched, images * gain + offset)
    plain = AnomalyDetector(net, AnomalyMap(sigma=1.0))
    plain.set_reference_levels(0.6, 0.1)
    with torch.no_grad():
        assert not torch.allclose(plain(images * 0.9)[0], plain(images)[0], atol=1e-3)


def test_the_reconstruction_comes_back_in_the_image_levels():
    images = 0.2 + 0.5 * torch.rand(2, 3, 16, 16)
    detector = AnomalyDetector(nn.Identity(), AnomalyMap(sigma=0), normalize_levels=True)
    unset_maps, _, unset_reconstruction = detector(images)  # no reference yet: unchanged
    assert torch.equal(unset_reconstruction, images) and not unset_maps.any()
    detector.set_reference_levels(0.5, 0.2)
    maps, _, reconstruction = detector(images)
    assert torch.allclose(reconstruction, images, atol=1e-5) and maps.abs().max() < 1e-5


def test_the_reference_levels_travel_in_the_state_dict():
    detector = AnomalyDetector(nn.Identity(), AnomalyMap(sigma=0), normalize_levels=True)
    detector.set_reference_levels(0.4, 0.15)
    fresh = AnomalyDetector(nn.Identity(), AnomalyMap(sigma=0), normalize_levels=True)
    fresh.load_state_dict(detector.state_dict())
    assert torch.allclose(fresh.reference_levels, torch.tensor([0.4, 0.15]))
    # A state dict from before level matching existed loads, and images pass unchanged.
    older = {k: v for k, v in detector.state_dict().items() if k != "reference_levels"}
    fresh.load_state_dict(older)
    images = torch.rand(1, 3, 8, 8)
    assert not fresh.has_reference_levels and torch.equal(fresh.match_levels(images)[0], images)
