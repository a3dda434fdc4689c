"""Property-based tests (hypothesis) for the metrics and the self-supervised corruptions.

Every reference value is computed here independently with plain numpy; the project's code is
only the thing under test. Runs are derandomized and use no example database, so CI sees the
same examples on every run.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from anomaly.data.corruptions import CHANGE_TOLERANCE, blob_mask, corrupt
from anomaly.data.textures import TextureSource
from anomaly.metrics import AUROC, F1Max, PixelMetrics, aupro, auroc, f1_max, pixel_metrics

PROPERTY = settings(database=None, derandomize=True, deadline=None, max_examples=60)

# Large offsets: at 1e6 float32 resolves only 1/16 (new ties) and a sigmoid saturates to 1.
OFFSETS = (0.0, 1e6, -1e6)


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------


@st.composite
def scored_labels(draw: st.DrawFn, min_size: int = 2, max_size: int = 40) -> tuple:
    """Scores (torch, float32 or float64) and {0, 1} int64 labels with both classes present.

    Scores come either from a small integer set (many ties) or from a grid of 1e-5 steps in
    [-10, 10], optionally shifted by a large offset.
    """
    size = draw(st.integers(min_size, max_size))
    if draw(st.booleans()):
        values = draw(st.lists(st.integers(0, 4), min_size=size, max_size=size))
        raw = np.asarray(values, dtype=np.float64)
    else:
        steps = draw(st.lists(st.integers(-1_000_000, 1_000_000), min_size=size, max_size=size))
        raw = np.asarray(steps, dtype=np.float64) / 1e5
    raw = raw + draw(st.sampled_from(OFFSETS))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    labels = np.asarray(draw(st.lists(st.booleans(), min_size=size, max_size=size)), np.int64)
    if labels.min() == labels.max():
        labels[0] = 1 - labels[0]
    return torch.tensor(raw, dtype=dtype), torch.from_numpy(labels)


@st.composite
def maps_and_masks(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W) random float maps and {0, 1} masks made of small rectangles.

    At least one defect pixel and at least one normal pixel are present.
    """
    num, height, width = draw(st.integers(1, 3)), draw(st.integers(4, 12)), draw(st.integers(4, 12))
    masks = np.zeros((num, height, width), np.int64)
    for _ in range(draw(st.integers(1, 4))):
        index = draw(st.integers(0, num - 1))
        top, left = draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1))
        rect_h, rect_w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        masks[index, top : top + rect_h, left : left + rect_w] = 1
    if masks.all():
        masks[0, 0, 0] = 0
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if draw(st.booleans()):
        maps = rng.integers(0, 4, masks.shape).astype(np.float64)  # ties
    else:
        maps = rng.random(masks.shape)
    maps = maps + draw(st.sampled_from(OFFSETS))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return torch.tensor(maps, dtype=dtype), torch.from_numpy(masks)


def mann_whitney_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(s+ > s-) + P(s+ = s-) / 2 over all positive/negative pairs, by brute force."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def f1_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    """F1 of predicting positive when score >= threshold (0 when nothing is predicted)."""
    predicted = scores >= threshold
    tp = int((predicted & (labels == 1)).sum())
    fp = int((predicted & (labels == 0)).sum())
    fn = int((~predicted & (labels == 1)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def same_order(before: np.ndarray, after: np.ndarray) -> bool:
    """Whether ``after`` ranks (ties included) exactly like ``before``."""
    return bool(
        np.array_equal(
            np.unique(before, return_inverse=True)[1], np.unique(after, return_inverse=True)[1]
        )
    )


MONOTONIC: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    # Shifted by the minimum first so that exp and the cubic stay finite and resolvable.
    "exp": lambda x: np.exp(x - x.min()),
    "affine": lambda x: 37.5 * x - 2.5e5,
    "tiny_scale": lambda x: 1e-3 * x + 1e6,
    "cubic": lambda x: (x - x.min() - 3.0) ** 3,
    "arctan": lambda x: np.arctan(x - np.median(x)),
}


# --------------------------------------------------------------------------------------------
# AUROC
# --------------------------------------------------------------------------------------------


@PROPERTY
@given(data=scored_labels())
def test_auroc_matches_mann_whitney(data: tuple) -> None:
    """Functional and exact stateful AUROC equal the pairwise statistic within 1e-6, in [0, 1]."""
    scores, labels = data
    expected = mann_whitney_auroc(scores.double().numpy(), labels.numpy())
    value = float(auroc(scores, labels))
    assert 0.0 <= value <= 1.0
    assert value == pytest.approx(expected, abs=1e-6)

    metric = AUROC()
    half = len(scores) // 2
    metric.update(scores[:half], labels[:half])
    metric.update(scores[half:], labels[half:])
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-6)


@PROPERTY
@given(data=scored_labels(), name=st.sampled_from(sorted(MONOTONIC)))
def test_auroc_invariant_to_monotonic_transforms(data: tuple, name: str) -> None:
    """A strictly increasing transform of the scores leaves the AUROC unchanged."""
    scores, labels = data
    before = scores.double().numpy()
    after = MONOTONIC[name](before)
    # Rounding may in rare cases merge two values; then the transform is not strict here.
    assume(same_order(before, after))
    assert float(auroc(torch.from_numpy(after), labels)) == pytest.approx(
        float(auroc(scores, labels)), abs=1e-9
    )


@PROPERTY
@given(data=scored_labels())
def test_auroc_label_flip(data: tuple) -> None:
    """Swapping the classes turns AUROC into 1 - AUROC; negating the scores does too."""
    scores, labels = data
    value = float(auroc(scores, labels))
    assert float(auroc(scores, 1 - labels)) == pytest.approx(1.0 - value, abs=1e-9)
    assert float(auroc(-scores, labels)) == pytest.approx(1.0 - value, abs=1e-9)


@PROPERTY
@given(
    data=maps_and_masks(),
    bins=st.integers(2, 64),
    low=st.sampled_from([0.0, -3.0, 1e6]),
    width=st.sampled_from([1.0, 7.0, 1e3]),
    seed=st.integers(0, 2**32 - 1),
)
def test_histogram_pixel_metrics_exact_on_bin_centres(
    data: tuple, bins: int, low: float, width: float, seed: int
) -> None:
    """With every map value on a bin centre, the histograms give the exact pixel metrics."""
    _, masks = data
    rng = np.random.default_rng(seed)
    index = rng.integers(0, bins, masks.shape)
    centres = torch.from_numpy(low + (index + 0.5) * (width / bins))
    expected = pixel_metrics(torch.from_numpy(index).double(), masks)
    assert float(expected["pixel_auroc"]) == pytest.approx(
        mann_whitney_auroc(index.ravel().astype(np.float64), masks.numpy().ravel()), abs=1e-9
    )
    metric = PixelMetrics(thresholds=bins, score_range=(low, low + width))
    for image in range(len(masks)):
        metric.update(centres[image : image + 1], masks[image : image + 1])
    for key, value in metric.compute().items():
        assert 0.0 <= float(value) <= 1.0
        assert float(value) == pytest.approx(float(expected[key]), abs=1e-9), key


# --------------------------------------------------------------------------------------------
# F1-max
# --------------------------------------------------------------------------------------------


@PROPERTY
@given(data=scored_labels(), quantile=st.floats(0.0, 1.0), pick_score=st.booleans())
def test_f1_max_bounds_every_threshold(data: tuple, quantile: float, pick_score: bool) -> None:
    """F1-max is at least the F1 of any threshold and equals the best over the scores."""
    scores, labels = data
    values, labels_np = scores.double().numpy(), labels.numpy()
    if pick_score:
        threshold = float(np.sort(values)[round(quantile * (len(values) - 1))])
    else:
        threshold = float(values.min() + quantile * (values.max() - values.min()))
    best = max(f1_at(values, labels_np, float(t)) for t in np.unique(values))

    value = float(f1_max(scores, labels))
    assert 0.0 < value <= 1.0
    assert value >= f1_at(values, labels_np, threshold) - 1e-12
    assert value == pytest.approx(best, abs=1e-12)

    metric = F1Max()
    metric.update(scores, labels)
    assert float(metric.compute()) == pytest.approx(best, abs=1e-12)


# --------------------------------------------------------------------------------------------
# AUPRO
# --------------------------------------------------------------------------------------------


@PROPERTY
@given(data=maps_and_masks(), fpr_limit=st.sampled_from([0.05, 0.3, 1.0]))
def test_aupro_in_unit_interval(data: tuple, fpr_limit: float) -> None:
    """AUPRO of random maps lies in [0, 1], and the stateful metric agrees over batches."""
    maps, masks = data
    value = float(aupro(maps, masks, fpr_limit))
    assert 0.0 <= value <= 1.0

    metric = PixelMetrics(fpr_limit=fpr_limit)
    for index in range(len(maps)):
        metric.update(maps[index : index + 1], masks[index : index + 1, None])
    assert float(metric.compute()["pixel_aupro"]) == pytest.approx(value, abs=1e-12)


@PROPERTY
@given(data=maps_and_masks(), fpr_limit=st.sampled_from([0.05, 0.3, 1.0]))
def test_aupro_extremes(data: tuple, fpr_limit: float) -> None:
    """The mask itself scores AUPRO 1; the inverted mask scores 0."""
    _, masks = data
    assert float(aupro(masks.double(), masks, fpr_limit)) == pytest.approx(1.0, abs=1e-12)
    assert float(aupro(-masks.double(), masks, fpr_limit)) == pytest.approx(0.0, abs=1e-12)


@PROPERTY
@given(data=maps_and_masks(), name=st.sampled_from(sorted(MONOTONIC)))
def test_aupro_invariant_to_monotonic_transforms(data: tuple, name: str) -> None:
    """A strictly increasing transform of the maps leaves AUPRO unchanged."""
    maps, masks = data
    before = maps.double().numpy()
    after = MONOTONIC[name](before.ravel()).reshape(before.shape)
    assume(same_order(before.ravel(), after.ravel()))
    assert float(aupro(torch.from_numpy(after), masks)) == pytest.approx(
        float(aupro(maps, masks)), abs=1e-9
    )


# --------------------------------------------------------------------------------------------
# Corruptions
# --------------------------------------------------------------------------------------------

TEXTURES = TextureSource(None)
PROBS = st.sampled_from([0.0, 0.5, 1.0])


def make_image(kind: str, height: int, width: int, seed: int) -> np.ndarray:
    """A float32 (H, W, 3) image in [0, 1]: uniform noise, a colour ramp, or a flat colour."""
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.random((height, width, 3), dtype=np.float32)
    if kind == "ramp":
        ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
        xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
        weights = rng.random((1, 1, 3), dtype=np.float32)
        return (weights * ys + (1 - weights) * xs).astype(np.float32)
    return np.broadcast_to(rng.random(3, dtype=np.float32), (height, width, 3)).copy()


@st.composite
def corruption_cases(draw: st.DrawFn, kinds: tuple[str, ...] = ("noise", "ramp", "flat")) -> dict:
    """Arguments of one `corrupt` call: image, seed and both probabilities."""
    height, width = draw(st.integers(16, 64)), draw(st.integers(16, 64))
    kind = draw(st.sampled_from(kinds))
    return {
        "image": make_image(kind, height, width, draw(st.integers(0, 2**16))),
        "seed": draw(st.integers(0, 2**32 - 1)),
        "texture_prob": draw(PROBS),
        "elastic_prob": draw(PROBS),
        "subtle": draw(st.booleans()),
    }


def run_corrupt(case: dict) -> tuple[np.ndarray, np.ndarray]:
    """`corrupt` on a copy of the case's image with a fresh generator of its seed."""
    return corrupt(
        case["image"].copy(),
        np.random.default_rng(case["seed"]),
        TEXTURES,
        texture_prob=case["texture_prob"],
        elastic_prob=case["elastic_prob"],
        subtle=case["subtle"],
    )


@PROPERTY
@given(case=corruption_cases())
def test_corrupt_output_contract(case: dict) -> None:
    """Float32 image in [0, 1] of the input's shape; binary float32 (H, W) mask."""
    image = case["image"]
    original = image.copy()
    corrupted, mask = corrupt(
        image,
        np.random.default_rng(case["seed"]),
        TEXTURES,
        case["texture_prob"],
        case["elastic_prob"],
    )
    assert np.array_equal(image, original)  # the input is not modified
    assert corrupted.dtype == np.float32 and corrupted.shape == image.shape
    assert np.isfinite(corrupted).all()
    assert corrupted.min() >= 0.0 and corrupted.max() <= 1.0
    assert mask.dtype == np.float32 and mask.shape == image.shape[:2]
    assert np.isin(mask, (0.0, 1.0)).all()


@PROPERTY
@given(case=corruption_cases())
def test_corrupt_mask_marks_exactly_the_changed_pixels(case: dict) -> None:
    """Outside the mask pixels are bit-identical; inside some channel moves > CHANGE_TOLERANCE."""
    image = case["image"]
    corrupted, mask = run_corrupt(case)
    outside, inside = mask == 0, mask == 1
    assert np.array_equal(corrupted[outside].view(np.uint32), image[outside].view(np.uint32))
    change = np.abs(corrupted - image).max(axis=-1)
    assert (change[inside] > CHANGE_TOLERANCE).all()
    if case["texture_prob"] == 0.0 and case["elastic_prob"] == 0.0:
        assert not inside.any()
        assert np.array_equal(corrupted, image)


@PROPERTY
@given(case=corruption_cases(kinds=("noise", "ramp")))
def test_corrupt_never_empty_on_textured_images(case: dict) -> None:
    """Unless both probabilities are 0, a non-flat image always gets a non-empty mask."""
    assume(case["texture_prob"] > 0.0 or case["elastic_prob"] > 0.0)
    corrupted, mask = run_corrupt(case)
    assert mask.any()
    assert not np.array_equal(corrupted, case["image"])


@settings(PROPERTY, max_examples=25)
@given(case=corruption_cases())
def test_corrupt_deterministic_for_a_seed(case: dict) -> None:
    """Two calls with generators of the same seed give bit-identical outputs."""
    first_image, first_mask = run_corrupt(case)
    second_image, second_mask = corrupt(
        case["image"].copy(),
        np.random.default_rng(case["seed"]),
        TextureSource(None),
        texture_prob=case["texture_prob"],
        elastic_prob=case["elastic_prob"],
        subtle=case["subtle"],
    )
    assert np.array_equal(first_image.view(np.uint32), second_image.view(np.uint32))
    assert np.array_equal(first_mask, second_mask)


@PROPERTY
@given(
    height=st.integers(1, 64),
    width=st.integers(1, 64),
    seed=st.integers(0, 2**32 - 1),
    areas=st.tuples(st.floats(1e-3, 1.0), st.floats(1e-3, 1.0)).map(sorted),
    max_blobs=st.integers(1, 4),
)
def test_blob_mask_covers_requested_area(
    height: int, width: int, seed: int, areas: list[float], max_blobs: int
) -> None:
    """A bool (H, W) mask with at least one pixel, covering a fraction in [min_area, max_area]."""
    min_area, max_area = areas
    mask = blob_mask(np.random.default_rng(seed), height, width, min_area, max_area, max_blobs)
    assert mask.dtype == np.bool_ and mask.shape == (height, width)
    pixels = height * width
    covered = int(mask.sum())
    # The kept count is max(1, round(area * pixels)) with area in [min_area, max_area].
    low = min(pixels, max(1, int(np.floor(min_area * pixels))))
    high = min(pixels, max(1, int(np.ceil(max_area * pixels))))
    assert low <= covered <= high
    again = blob_mask(np.random.default_rng(seed), height, width, min_area, max_area, max_blobs)
    assert np.array_equal(mask, again)
