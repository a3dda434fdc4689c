"""Tests for the per-pixel error maps (SSIM, MSGMS, Gaussian filter) and the objective's loss."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from anomaly.anomaly_map import AnomalyMap
from anomaly.errors import ConfigError
from anomaly.objective import ReconstructionLoss
from anomaly.similarity import (
    ERROR_TERMS,
    WeightedErrorTerms,
    error_map,
    gaussian_filter,
    gaussian_kernel1d,
    msgms_map,
    ssim_map,
)


def test_ssim_map_identical_is_one_and_different_is_less() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 24, 20)
    torch.testing.assert_close(ssim_map(x, x), torch.ones_like(x))
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    s = ssim_map(x, y)
    assert s.shape == x.shape
    assert s.max() <= 1 + 1e-6 and s.mean() < 0.9


def test_ssim_map_matches_brute_force_at_an_interior_pixel() -> None:
    torch.manual_seed(0)
    x, y = torch.rand(1, 1, 16, 16, dtype=torch.float64), torch.rand(1, 1, 16, 16).double()
    r, c, half, sigma = 8, 7, 5, 1.5
    offsets = np.arange(-half, half + 1)
    window = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))
    window /= window.sum()
    px = x[0, 0, r - half : r + half + 1, c - half : c + half + 1].numpy()
    py = y[0, 0, r - half : r + half + 1, c - half : c + half + 1].numpy()
    mx, my = (window * px).sum(), (window * py).sum()
    vx = (window * (px - mx) ** 2).sum()
    vy = (window * (py - my) ** 2).sum()
    cov = (window * (px - mx) * (py - my)).sum()
    c1, c2 = 0.01**2, 0.03**2
    expected = (2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert ssim_map(x, y)[0, 0, r, c].item() == pytest.approx(expected, rel=1e-9)


def test_msgms_identical_is_zero_and_ignores_a_brightness_offset() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 24) * 0.8
    assert msgms_map(x, x).shape == (2, 1, 32, 24)
    assert (msgms_map(x, x) == 0).all()
    # Gradients ignore a constant offset.
    torch.testing.assert_close(msgms_map(x, x + 0.1), torch.zeros(2, 1, 32, 24))
    y = torch.rand(2, 3, 32, 24)
    m = msgms_map(x, y)
    assert m.min() >= 0 and m.max() < 1 and m.mean() > 0.05


def test_msgms_single_scale_matches_brute_force() -> None:
    torch.manual_seed(0)
    x, y = torch.rand(1, 3, 12, 12, dtype=torch.float64), torch.rand(1, 3, 12, 12).double()
    gray_x = (0.299 * x[0, 0] + 0.587 * x[0, 1] + 0.114 * x[0, 2]).numpy()
    gray_y = (0.299 * y[0, 0] + 0.587 * y[0, 1] + 0.114 * y[0, 2]).numpy()

    def magnitude(img: np.ndarray, r: int, c: int) -> float:
        gx = (img[r - 1 : r + 2, c - 1].sum() - img[r - 1 : r + 2, c + 1].sum()) / 3
        gy = (img[r - 1, c - 1 : c + 2].sum() - img[r + 1, c - 1 : c + 2].sum()) / 3
        return float(np.hypot(gx, gy))

    result = msgms_map(x, y, scales=(1,))
    for r, c in [(3, 4), (6, 6), (10, 1)]:
        mx, my = magnitude(gray_x, r, c), magnitude(gray_y, r, c)
        expected = 1 - (2 * mx * my + 0.0026) / (mx**2 + my**2 + 0.0026)
        assert result[0, 0, r, c].item() == pytest.approx(expected, abs=1e-9)


def test_similarity_maps_reject_bad_input() -> None:
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="same shape"):
        ssim_map(x, torch.rand(1, 3, 16, 8))
    with pytest.raises(ValueError, match="odd"):
        ssim_map(x, x, window_size=4)
    with pytest.raises(ValueError, match="too small"):
        msgms_map(x, x, scales=(1, 32))


def test_gaussian_filter_matches_scipy_with_mirrored_borders() -> None:
    torch.manual_seed(1)
    x = torch.rand(2, 3, 20, 27, dtype=torch.float64)
    filtered = gaussian_filter(x, gaussian_kernel1d(2.0, dtype=torch.float64))
    expected = ndimage.gaussian_filter(x.numpy(), (0, 0, 2.0, 2.0), mode="mirror", truncate=4.0)
    assert np.allclose(filtered.numpy(), expected, atol=1e-6)


def test_gaussian_filter_on_images_narrower_than_the_kernel_keeps_their_size() -> None:
    x = torch.rand(1, 1, 3, 40)
    filtered = gaussian_filter(x, gaussian_kernel1d(4.0))
    assert filtered.shape == x.shape and torch.isfinite(filtered).all()


def test_error_terms_are_the_documented_formulas_in_zero_one() -> None:
    torch.manual_seed(2)
    pred, target = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    expected = {
        "l2": ((pred - target) ** 2).mean(1),
        "l1": (pred - target).abs().mean(1),
        "ssim": (1 - ssim_map(pred, target)).mean(1) / 2,
        "gradient": msgms_map(pred, target)[:, 0],
    }
    for term in ERROR_TERMS:
        err = error_map(term, pred, target)
        assert err.shape == (2, 16, 16) and err.min() >= 0 and err.max() <= 1
        torch.testing.assert_close(err, expected[term])
    with pytest.raises(ValueError, match="unknown error term"):
        error_map("l3", pred, target)


# ---------------------------------------------------------------- reconstruction loss


def test_ssim_weight_two_is_the_usual_one_minus_ssim_loss() -> None:
    torch.manual_seed(3)
    pred, target = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    total, _ = ReconstructionLoss(l2=0.0, ssim=2.0)(pred, target)
    assert total.item() == pytest.approx((1 - ssim_map(pred, target)).mean().item(), rel=1e-5)


def test_reconstruction_loss_matches_hand_computation() -> None:
    torch.manual_seed(0)
    pred, target = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    mask = (torch.rand(2, 1, 8, 8) > 0.7).float()
    p, t, m = pred.numpy(), target.numpy(), mask.numpy()[:, 0]
    n = m.size  # the means run over all B * H * W pixels
    k = 3.0
    total, terms = ReconstructionLoss(l2=2.0, l1=0.5, corrupted_weight=k)(pred, target, mask)
    assert set(terms) == {"l2", "l1"}
    for name, err in [("l2", ((p - t) ** 2).mean(1)), ("l1", np.abs(p - t).mean(1))]:
        inside, outside = err[m == 1].sum(), err[m == 0].sum()
        assert terms[name].item() == pytest.approx((outside + k * inside) / n, rel=1e-5)
    assert total.item() == pytest.approx(2.0 * terms["l2"].item() + 0.5 * terms["l1"].item())


def test_reconstruction_loss_corrupted_part_scales_linearly() -> None:
    torch.manual_seed(0)
    pred, target = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:10, 2:8] = 1

    def loss(k: float) -> float:
        fn = ReconstructionLoss(l2=1.0, l1=1.0, ssim=1.0, gradient=1.0, corrupted_weight=k)
        total, terms = fn(pred, target, mask)
        assert set(terms) == {"l2", "l1", "ssim", "gradient"}
        assert total.item() == pytest.approx(sum(t.item() for t in terms.values()), rel=1e-6)
        return total.item()

    base, unit = loss(0.0), loss(1.0) - loss(0.0)
    assert unit > 0
    assert loss(4.0) == pytest.approx(base + 4 * unit, rel=1e-5)
    # corrupted_weight = 1 is the plain mean, the same as having no mask.
    no_mask, _ = ReconstructionLoss(l2=1.0, l1=1.0, ssim=1.0, gradient=1.0)(pred, target)
    assert no_mask.item() == pytest.approx(loss(1.0), rel=1e-5)


@pytest.mark.parametrize("name", ["l2", "l1", "ssim", "gradient", "corrupted_weight"])
def test_reconstruction_loss_rejects_negative_weights(name: str) -> None:
    with pytest.raises(ConfigError, match=f"{name} must be >= 0"):
        ReconstructionLoss(**{name: -0.1})


@pytest.mark.parametrize("weight", ["abc", None, True])
def test_error_term_weights_must_be_numbers(weight) -> None:
    # A weight given on the command line as text is a one-line config error, not a TypeError.
    with pytest.raises(ConfigError, match="weight ssim must be >= 0, got"):
        WeightedErrorTerms(ssim=weight)


def test_reconstruction_loss_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="at least one"):
        ReconstructionLoss(l2=0.0)
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="mask of shape"):
        ReconstructionLoss()(x, x, torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="same shape"):
        ReconstructionLoss()(x, x[:1])


def test_the_map_and_the_loss_stay_float32_under_bfloat16_mixed_precision():
    # trainer.precision=bf16-mixed runs the network in bfloat16; the errors of a good
    # reconstruction are smaller than its steps, so the map and the loss must not follow it.
    torch.manual_seed(0)
    image = torch.rand(2, 3, 32, 32)
    reconstruction = (image + 0.01 * torch.randn_like(image)).clamp(0, 1)
    mask = (torch.rand(2, 1, 32, 32) > 0.8).float()
    anomaly_map = AnomalyMap(l2=10.0, ssim=1.0, gradient=1.0, sigma=1.0)
    loss = ReconstructionLoss(corrupted_weight=5.0, l2=1.0, ssim=2.0, gradient=1.0)
    expected_map, (expected_loss, _) = (
        anomaly_map(image, reconstruction),
        loss(reconstruction, image, mask),
    )
    with torch.autocast("cpu", torch.bfloat16):
        mixed_map = anomaly_map(image, reconstruction)
        mixed_loss, _ = loss(reconstruction, image, mask)
        # The reconstruction in bfloat16, as the network hands it over: only its rounding moves.
        rounded_loss, terms = loss(reconstruction.bfloat16(), image, mask)
    assert mixed_map.dtype == torch.float32 and torch.equal(mixed_map, expected_map)
    assert mixed_loss.dtype == torch.float32 and torch.equal(mixed_loss, expected_loss)
    assert all(value.dtype == torch.float32 for value in terms.values())
    assert rounded_loss.item() == pytest.approx(expected_loss.item(), rel=0.05)
