"""Metrics against brute-force references on tiny random data with ties."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import ndimage

from anomaly.metrics import (
    AUROC,
    F1Max,
    PerGroupAUROC,
    PixelMetrics,
    aupro,
    auroc,
    f1_max,
    pixel_metrics,
    roc_curve,
)


def tied_scores(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) float64 scores rounded to one decimal (many ties) and (n,) {0, 1} labels."""
    gen = torch.Generator().manual_seed(seed)
    target = (torch.rand(n, generator=gen) < 0.4).long()
    preds = (torch.rand(n, generator=gen) + 0.3 * target).mul(10).round().div(10).double()
    return preds, target


def brute_auroc(preds: torch.Tensor, target: torch.Tensor) -> float:
    pos, neg = preds[target == 1], preds[target == 0]
    greater = (pos[:, None] > neg[None, :]).double().mean()
    tied = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + 0.5 * tied)


def brute_f1_max(preds: torch.Tensor, target: torch.Tensor) -> float:
    best = 0.0
    for threshold in preds.unique():
        predicted = preds >= threshold
        tp = int((predicted & (target == 1)).sum())
        fp = int((predicted & (target == 0)).sum())
        fn = int((~predicted & (target == 1)).sum())
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """Slow AUPRO: one pass over the set per distinct threshold."""
    normal = masks == 0
    per_image_regions = []
    for index, mask in enumerate(masks):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        per_image_regions += [(index, labels == i) for i in range(1, count + 1)]
    curve = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        above = maps >= threshold
        fpr = (above & normal).sum() / normal.sum()
        pro = np.mean([above[i][region].sum() / region.sum() for i, region in per_image_regions])
        curve.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(curve[:-1], curve[1:], strict=True):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def random_maps_and_masks(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(5, 12, 12) tied maps and masks: rectangles, diagonal touches, two defect-free images."""
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros(5, 12, 12, dtype=torch.long)
    for image in (0, 1, 2):
        for _ in range(3):
            top, left = torch.randint(0, 10, (2,), generator=gen).tolist()
            height, width = torch.randint(1, 4, (2,), generator=gen).tolist()
            masks[image, top : top + height, left : left + width] = 1
    # Diagonal neighbours: one region under 8-connectivity, two under 4-connectivity.
    masks[3, 2:4, 2:4] = 1
    masks[3, 4:7, 4:7] = 1
    maps = (torch.rand(5, 12, 12, generator=gen) + 0.4 * masks).mul(20).round().div(20)
    return maps, masks


def test_auroc_matches_pairwise_count_with_ties():
    for seed in range(3):
        preds, target = tied_scores(300, seed)
        assert auroc(preds, target).dtype == torch.float64
        assert auroc(preds, target).item() == pytest.approx(brute_auroc(preds, target), abs=1e-12)
        grid = auroc(preds.reshape(15, 20), target.reshape(15, 20))
        assert grid.item() == pytest.approx(brute_auroc(preds, target), abs=1e-12)


def test_auroc_invariant_under_monotonic_transforms():
    preds, target = tied_scores(200, 7)
    expected = auroc(preds, target).item()
    for transformed in (preds * 1e6, preds * 1e-6, preds.exp(), preds + 1e6, 3 * preds - 5):
        assert auroc(transformed, target).item() == pytest.approx(expected, abs=1e-12)


def test_auroc_large_float32_scores_do_not_saturate():
    preds, target = tied_scores(200, 3)
    large = (1e3 + 100 * preds).float()
    # A sigmoid would map every one of these scores to 1.0 and tie them all.
    assert torch.sigmoid(large).unique().numel() == 1
    expected = brute_auroc(large.double(), target)
    assert expected > 0.6
    assert auroc(large, target).item() == pytest.approx(expected, abs=1e-12)
    metric = AUROC()
    metric.update(large, target)
    assert metric.compute().item() == pytest.approx(expected, abs=1e-12)


def test_auroc_nan_without_one_class():
    preds = torch.rand(10)
    assert math.isnan(auroc(preds, torch.zeros(10)).item())
    assert math.isnan(auroc(preds, torch.ones(10)).item())


def test_f1_max_matches_exhaustive_thresholds():
    for seed in range(3):
        preds, target = tied_scores(150, seed)
        assert f1_max(preds, target).item() == pytest.approx(brute_f1_max(preds, target))
    assert math.isnan(f1_max(torch.rand(5), torch.zeros(5)).item())


@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_slow_reference(fpr_limit):
    for seed in range(2):
        maps, masks = random_maps_and_masks(seed)
        expected = reference_aupro(maps.numpy(), masks.numpy(), fpr_limit)
        assert aupro(maps, masks, fpr_limit).item() == pytest.approx(expected, abs=1e-10)


def test_aupro_uses_8_connectivity():
    # Pixels (0,0),(0,1) and (1,2) touch diagonally: one region of 3 pixels, not 2 + 1.
    masks = torch.zeros(1, 3, 3, dtype=torch.long)
    masks[0, 0, 0] = masks[0, 0, 1] = masks[0, 1, 2] = 1
    maps = torch.full((1, 3, 3), 0.5)
    maps[0, 1, 2], maps[0, 0, 0], maps[0, 0, 1] = 0.9, 0.1, 0.1
    # Curve (0,0) -> (0,1/3) -> (1,1/3) -> (1,1); 4-connectivity would give 1/2.
    assert aupro(maps, masks).item() == pytest.approx(1 / 3)


def test_aupro_ties_enter_together_and_limit_is_interpolated():
    masks = torch.zeros(1, 1, 11, dtype=torch.long)
    masks[0, 0, 0] = 1
    maps = torch.full((1, 1, 11), 0.5)
    # One tied threshold jumps from (0, 0) to (1, 1): area up to 0.3 is 0.3^2 / 2.
    assert aupro(maps, masks, 0.3).item() == pytest.approx(0.15)


def test_aupro_bounds_perfect_map_and_nan():
    _, masks = random_maps_and_masks(4)
    assert aupro(masks.double(), masks).item() == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks.double(), masks).item() <= 1.0
    assert aupro(-masks.double(), masks).item() == pytest.approx(0.0, abs=1e-12)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        maps, masks = torch.rand(3, 8, 8, generator=gen), torch.rand(3, 8, 8, generator=gen) > 0.7
        value = aupro(maps, masks.long()).item()
        assert 0.0 <= value <= 1.0
    assert math.isnan(aupro(torch.rand(2, 4, 4), torch.zeros(2, 4, 4)).item())
    assert math.isnan(aupro(torch.rand(2, 4, 4), torch.ones(2, 4, 4)).item())


def test_pixel_metrics_equal_the_single_metrics_at_scale():
    # 6 x 48 x 48 with heavy ties: every tie and limit case of one sort shared by three metrics.
    gen = torch.Generator().manual_seed(3)
    masks = torch.zeros(6, 48, 48, dtype=torch.long)
    for image in range(4):
        top, left = torch.randint(0, 40, (2,), generator=gen).tolist()
        masks[image, top : top + 8, left : left + 5] = 1
        masks[image, 5, 5:30] = 1  # a thin scratch: a region of 25 pixels
    maps = (torch.rand(6, 48, 48, generator=gen) + 0.5 * masks).mul(30).round().div(30)
    results = pixel_metrics(maps, masks)
    assert results["pixel_auroc"].item() == pytest.approx(brute_auroc(maps, masks), abs=1e-12)
    assert results["pixel_f1_max"].item() == pytest.approx(brute_f1_max(maps, masks), abs=1e-12)
    expected = reference_aupro(maps.numpy(), masks.numpy(), 0.3)
    assert results["pixel_aupro"].item() == pytest.approx(expected, abs=1e-10)
    assert aupro(maps, masks).item() == results["pixel_aupro"].item()


def test_binned_pixel_metrics_close_to_exact_and_bounded():
    gen = torch.Generator().manual_seed(0)
    masks = (torch.rand(8, 32, 32, generator=gen) < 0.3).long()
    maps = (torch.rand(8, 32, 32, generator=gen) * 0.8 + 0.2 * masks).float()
    exact = pixel_metrics(maps, masks)
    metric = PixelMetrics(thresholds=500)
    metric.update(maps[:5], masks[:5])
    metric.update(maps[5:], masks[5:])
    for key, value in metric.compute().items():
        assert value.item() == pytest.approx(exact[key].item(), abs=0.01), key
    # The states are three histograms and a count, whatever the number of maps.
    assert sum(state.numel() for state in metric.metric_state.values()) == 3 * 500 + 1
    # Scores outside score_range are clamped into the end bins instead of being dropped.
    metric = PixelMetrics(thresholds=10, score_range=(0.0, 1.0))
    metric.update(torch.tensor([[[-5.0, 0.05, 0.95, 7.0]]]), torch.tensor([[[0, 0, 1, 1]]]))
    assert metric.compute()["pixel_auroc"].item() == pytest.approx(1.0)
    assert int(metric.normal_hist.sum() + metric.defect_hist.sum()) == 4


@pytest.mark.parametrize("make", [AUROC, F1Max])
def test_split_updates_and_merged_states_equal_one_update(make):
    preds, target = tied_scores(240, 5)
    whole = make()
    whole.update(preds, target)
    split = make()
    for chunk in range(3):
        split.update(preds[chunk * 80 : (chunk + 1) * 80], target[chunk * 80 : (chunk + 1) * 80])
    # merge_state applies the same reductions ("cat"/"sum") as a DDP sync.
    first, second = make(), make()
    first.update(preds[:100], target[:100])
    second.update(preds[100:], target[100:])
    first.merge_state(second)
    assert split.compute().item() == pytest.approx(whole.compute().item(), abs=1e-12)
    assert first.compute().item() == pytest.approx(whole.compute().item(), abs=1e-12)


@pytest.mark.parametrize("thresholds", [None, 40])
def test_pixel_metrics_split_merged_and_channel_masks(thresholds):
    maps, masks = random_maps_and_masks(1)
    whole = PixelMetrics(thresholds=thresholds)
    whole.update(maps, masks)
    split = PixelMetrics(thresholds=thresholds)
    split.update(maps[:2], masks[:2, None])
    split.update(maps[2:], masks[2:])
    first, second = PixelMetrics(thresholds=thresholds), PixelMetrics(thresholds=thresholds)
    first.update(maps[:3], masks[:3])
    second.update(maps[3:], masks[3:])
    first.merge_state(second)
    expected = whole.compute()
    if thresholds is None:
        assert expected == pixel_metrics(maps, masks)
    for metric in (split, first):
        for key, value in metric.compute().items():
            assert value.item() == pytest.approx(expected[key].item(), abs=1e-12), key


def test_per_group_auroc_against_hand_made_subsets():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.3, 0.7, 0.5])
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 0, 1, 1])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 0, 2, 1])
    metric = PerGroupAUROC(num_groups=4)
    metric.update(scores[:4], labels[:4], groups[:4])
    metric.update(scores[4:], labels[4:], groups[4:])
    result = metric.compute()
    normal = [0, 1, 2, 6]
    for group, anomalous in ((1, [3, 4, 8]), (2, [5, 7])):
        subset = torch.tensor(normal + anomalous)
        expected = auroc(scores[subset], labels[subset]).item()
        assert result[group].item() == pytest.approx(expected)
    assert result[1].item() == pytest.approx(
        brute_auroc(scores[[0, 1, 2, 6, 3, 4, 8]], labels[[0, 1, 2, 6, 3, 4, 8]])
    )
    assert result[2].item() == pytest.approx(1.0)
    # Groups 0 (only normal images) and 3 (empty) have no anomalous images.
    assert math.isnan(result[0].item()) and math.isnan(result[3].item())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: auroc(torch.rand(4), torch.ones(5)), "differ"),
        (lambda: auroc(torch.rand(4), torch.tensor([0, 1, 2, 0])), "only 0 and 1"),
        (lambda: f1_max(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1])), "nan"),
        (lambda: aupro(torch.rand(2, 4, 4), torch.zeros(2, 4, 5)), "equal shape"),
        (lambda: aupro(torch.rand(2, 4, 4), torch.zeros(2, 4, 4), fpr_limit=0.0), "fpr_limit"),
        (lambda: PixelMetrics(thresholds=1), "thresholds"),
        (lambda: PixelMetrics(thresholds=10, score_range=(1.0, 1.0)), "score_range"),
        (lambda: PixelMetrics(fpr_limit=1.5), "fpr_limit"),
        (lambda: PixelMetrics().update(torch.rand(2, 4, 4), torch.zeros(2, 2, 4, 4)), "same shape"),
        (
            lambda: PerGroupAUROC(2).update(torch.rand(2), torch.ones(2), torch.tensor([0, 2])),
            "groups must be",
        ),
        (lambda: PerGroupAUROC(0), "num_groups"),
    ],
)
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def _ddp_worker(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    preds, target = tied_scores(101, 9)
    maps, masks = random_maps_and_masks(2)
    # Uneven shards: rank 0 gets more samples than rank 1.
    own = slice(0, 60) if rank == 0 else slice(60, None)
    own_images = slice(0, 3) if rank == 0 else slice(3, None)
    image_metric, exact, binned = AUROC(), PixelMetrics(), PixelMetrics(thresholds=20)
    image_metric.update(preds[own], target[own])
    exact.update(maps[own_images], masks[own_images])
    binned.update(maps[own_images], masks[own_images])
    values = [image_metric.compute().item()]
    for metric in (exact, binned):
        values += [value.item() for value in metric.compute().values()]
    if rank == 0:
        results.update(values=values)
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gloo_two_processes_match_single_process():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(port, results), nprocs=2)
        values = results["values"]
    preds, target = tied_scores(101, 9)
    maps, masks = random_maps_and_masks(2)
    binned = PixelMetrics(thresholds=20)
    binned.update(maps, masks)
    expected = [auroc(preds, target).item()]
    expected += [value.item() for value in pixel_metrics(maps, masks).values()]
    expected += [value.item() for value in binned.compute().values()]
    assert values == pytest.approx(expected, abs=1e-12)
    assert values[3] == pytest.approx(reference_aupro(maps.numpy(), masks.numpy(), 0.3))


def test_roc_curve_area_equals_auroc_and_ends_at_corners():
    generator = torch.Generator().manual_seed(7)
    preds = torch.randint(0, 20, (300,), generator=generator).float() * 1e5  # many ties, large
    target = (torch.rand(300, generator=generator) < 0.3).long()
    fpr, tpr = roc_curve(preds, target)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert torch.all(fpr.diff() >= 0) and torch.all(tpr.diff() >= 0)
    assert torch.isclose(torch.trapezoid(tpr, fpr), auroc(preds, target))


def test_roc_curve_with_max_points_keeps_exact_points_and_corners():
    generator = torch.Generator().manual_seed(8)
    target = (torch.rand(20_000, generator=generator) < 0.05).long()
    preds = torch.rand(20_000, generator=generator) + 0.5 * target
    full_fpr, full_tpr = roc_curve(preds, target)
    fpr, tpr = roc_curve(preds, target, max_points=200)
    assert len(fpr) <= 201 < len(full_fpr)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    full = set(zip(full_fpr.tolist(), full_tpr.tolist(), strict=True))
    assert set(zip(fpr.tolist(), tpr.tolist(), strict=True)) <= full
    assert torch.trapezoid(tpr, fpr).item() == pytest.approx(auroc(preds, target).item(), abs=1e-3)
