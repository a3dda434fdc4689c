"""Tests for the reconstruction networks (tiny sizes, CPU, a few seconds)."""

import numpy as np
import pytest
import torch

from anomaly.errors import ConfigError
from anomaly.models.residual_ae import ResidualAutoencoder
from anomaly.models.sdc_ccm import ConvexCombination, SDCBlock, SDCCCMAutoencoder
from anomaly.objective import ReconstructionLoss

SIZES = [(32, 32), (64, 64), (96, 96), (32, 48)]
DILATIONS = (1, 2, 4, 8, 16, 32)


@pytest.fixture(autouse=True)
def _single_thread():
    """Run single-threaded: these tensors are too small to gain from threads, and on a busy
    2-core machine waiting threads made the file 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check_reconstruction(model: torch.nn.Module, height: int, width: int) -> None:
    x = torch.rand(2, 3, height, width)
    y = model(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    assert y.min() >= 0 and y.max() <= 1


# ---------------------------------------------------------------- residual autoencoder


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("latent", ["spatial", "vector"])
def test_residual_ae_shapes_and_range(height: int, width: int, latent: str) -> None:
    torch.manual_seed(0)
    kwargs = {"latent_dim": 8, "image_size": (height, width)} if latent == "vector" else {}
    model = ResidualAutoencoder(channels=(4, 4, 8, 8), latent_channels=4, **kwargs)
    _check_reconstruction(model, height, width)


@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
def test_residual_ae_norms_and_upsampling(norm: str, upsample: str) -> None:
    torch.manual_seed(0)
    model = ResidualAutoencoder(channels=(4, 8), latent_channels=4, norm=norm, upsample=upsample)
    _check_reconstruction(model, 32, 32)


def test_residual_ae_rejects_bad_input() -> None:
    model = ResidualAutoencoder(channels=(4, 4, 8, 8), latent_channels=4)
    with pytest.raises(ConfigError, match="100x100 is not divisible by 16 \\(4 downsampling"):
        model(torch.rand(1, 3, 100, 100))
    with pytest.raises(ConfigError, match="not divisible by 16"):
        model(torch.rand(1, 3, 32, 40))
    with pytest.raises(ValueError, match="expected input of shape"):
        model(torch.rand(1, 1, 32, 32))
    with pytest.raises(ConfigError, match="needs image_size"):
        ResidualAutoencoder(channels=(4, 8), latent_dim=8)
    with pytest.raises(ConfigError, match="not divisible by 4"):
        ResidualAutoencoder(channels=(4, 8), latent_dim=8, image_size=30)
    with pytest.raises(ConfigError, match="unknown norm"):
        ResidualAutoencoder(norm="layer")
    vector = ResidualAutoencoder(channels=(4, 8), latent_dim=8, image_size=32)
    with pytest.raises(ValueError, match="fully connected latent"):
        vector(torch.rand(1, 3, 64, 64))


# ---------------------------------------------------------------- SDC-CCM autoencoder


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("skip", ["ccm", "concat", "none"])
@pytest.mark.parametrize("sdc", [True, False])
def test_sdc_ccm_shapes_and_range(height: int, width: int, skip: str, sdc: bool) -> None:
    torch.manual_seed(0)
    model = SDCCCMAutoencoder(channels=(4, 8, 12), num_sdc_blocks=2, skip=skip, sdc=sdc)
    _check_reconstruction(model, height, width)


@pytest.mark.parametrize("norm", ["instance", "group", "none"])
def test_sdc_ccm_norms(norm: str) -> None:
    torch.manual_seed(0)
    _check_reconstruction(SDCCCMAutoencoder(channels=(4, 12), num_sdc_blocks=1, norm=norm), 32, 32)


def test_sdc_ccm_rejects_bad_input() -> None:
    model = SDCCCMAutoencoder(channels=(4, 8, 12), num_sdc_blocks=1)
    with pytest.raises(ConfigError, match="30x32 is not divisible by 4 \\(2 downsampling"):
        model(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match="expected input of shape"):
        model(torch.rand(3, 32, 32))
    with pytest.raises(ConfigError, match="unknown skip"):
        SDCCCMAutoencoder(skip="add")
    with pytest.raises(ConfigError, match="cannot be split"):
        SDCCCMAutoencoder(channels=(4, 4))


def test_ccm_is_a_convex_combination_with_gradients_to_both_inputs() -> None:
    torch.manual_seed(0)
    ccm = ConvexCombination(5)
    # Large magnitudes push the sigmoid into saturation, where a must still stay in [0, 1].
    e = (torch.randn(2, 5, 8, 8) * 50).requires_grad_()
    d = (torch.randn(2, 5, 8, 8) * 50).requires_grad_()
    a = ccm.coefficient(e, d)
    assert a.shape == e.shape
    assert a.min() >= 0 and a.max() <= 1
    assert 0 < a.mean() < 1  # not all saturated to one side
    out = ccm(e, d)
    torch.testing.assert_close(out, a * e + (1 - a) * d)
    tol = 1e-4
    assert (out >= torch.minimum(e, d) - tol).all() and (out <= torch.maximum(e, d) + tol).all()

    ccm = ConvexCombination(5)
    e = torch.randn(2, 5, 8, 8, requires_grad=True)
    d = torch.randn(2, 5, 8, 8, requires_grad=True)
    ccm(e, d).square().sum().backward()
    assert e.grad.abs().sum() > 0 and d.grad.abs().sum() > 0
    assert ccm.gate.weight.grad.abs().sum() > 0


def _influence(block: torch.nn.Module, channels: int, size: int = 81) -> torch.Tensor:
    """|d out[centre] / d input| summed over channels: (size, size) map of the inputs used."""
    block.eval()  # batch norm with running statistics, so pixels do not interact through it
    x = torch.randn(1, channels, size, size, requires_grad=True)
    centre = size // 2
    block(x)[0, :, centre, centre].sum().backward()
    return x.grad[0].abs().sum(dim=0)


def _offsets(influence: torch.Tensor) -> set[tuple[int, int]]:
    centre = influence.shape[0] // 2
    rows, cols = torch.nonzero(influence > 0, as_tuple=True)
    return {(int(r) - centre, int(c) - centre) for r, c in zip(rows, cols, strict=True)}


def test_sdc_block_reaches_exactly_its_dilations() -> None:
    torch.manual_seed(0)
    used = _offsets(_influence(SDCBlock(12, DILATIONS, "batch"), 12))
    # Brute force: a 3x3 kernel with dilation r reads offsets {-r, 0, r}^2.
    expected = {(i * r, j * r) for r in DILATIONS for i in (-1, 0, 1) for j in (-1, 0, 1)}
    assert used == expected
    assert max(max(abs(i), abs(j)) for i, j in used) == 32

    plain = _offsets(_influence(SDCBlock(12, (1,) * len(DILATIONS), "batch"), 12))
    assert plain == {(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)}


@pytest.mark.parametrize("sdc", [True, False])
def test_sdc_bottleneck_receptive_field(sdc: bool) -> None:
    torch.manual_seed(0)
    model = SDCCCMAutoencoder(channels=(4, 12), num_sdc_blocks=4, dilations=DILATIONS, sdc=sdc)
    influence = _influence(model.bottleneck, 12)
    centre = influence.shape[0] // 2
    far = influence[centre, centre + 32], influence[centre - 32, centre]
    if sdc:
        assert all(v > 0 for v in far)
    else:  # 4 plain 3x3 blocks reach 4 positions
        assert all(v == 0 for v in far)
        assert influence[centre, centre + 4] > 0 and influence[centre, centre + 5] == 0


# ---------------------------------------------------------------- training smoke test


def _corrupted_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Smooth clean images (4, 3, 32, 32), copies with random squares, and the square masks."""
    g = torch.Generator().manual_seed(0)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    phase = torch.rand(4, 3, 1, 1, generator=g) * 6
    clean = 0.5 + 0.3 * torch.sin(6 * xs + 4 * ys + phase)
    mask = torch.zeros(4, 1, 32, 32)
    corrupted = clean.clone()
    for i in range(4):
        r, c = torch.randint(0, 24, (2,), generator=g).tolist()
        mask[i, :, r : r + 8, c : c + 8] = 1
        corrupted[i, :, r : r + 8, c : c + 8] = torch.rand(3, 1, 1, generator=g)
    return clean, corrupted, mask


@pytest.mark.parametrize(
    "make_model",
    [
        lambda: ResidualAutoencoder(channels=(8, 8, 16), latent_channels=8),
        lambda: SDCCCMAutoencoder(channels=(8, 12, 12), num_sdc_blocks=2),
    ],
    ids=["residual_ae", "sdc_ccm"],
)
def test_a_few_adam_steps_lower_the_loss(make_model) -> None:
    torch.manual_seed(0)
    model = make_model()
    clean, corrupted, mask = _corrupted_batch()
    loss_fn = ReconstructionLoss(l2=1.0, ssim=1.0, corrupted_weight=2.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, _ = loss_fn(model(corrupted), clean, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.5 * losses[0]
