"""The verdict threshold: calibrated on validation, stored in the detector, read as 0-1 scores."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from anomaly.detector import AnomalyDetector, calibrate_threshold
from anomaly.errors import ConfigError
from tests.conftest import make_datamodule
from tests.test_module import quiet_trainer, small_module


def scored(seed: int, n: int = 80, ties: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=gen) < 0.4).long()
    scores = torch.rand(n, generator=gen) + 0.6 * labels
    return (scores.mul(8).round() if ties else scores), labels


def brute_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The highest threshold of the best F1 over every distinct score, one at a time, with the
    anomalous images repeated so that both classes count alike (by fractions, written out)."""
    best, chosen = -1.0, math.nan
    normals, anomalies = int((labels == 0).sum()), int((labels == 1).sum())
    for threshold in sorted(set(scores.tolist())):
        called = scores >= threshold
        tp = Fraction(int((called & (labels == 1)).sum()) * normals, anomalies)
        fp = int((called & (labels == 0)).sum())
        fn = normals - tp
        f1 = 2 * tp / (2 * tp + fp + fn)
        if f1 >= best:
            best, chosen = f1, threshold
    return chosen


@pytest.mark.parametrize("ties", [False, True])
def test_f1_max_threshold_is_the_best_f1_score(ties):
    for seed in range(4):
        scores, labels = scored(seed, ties=ties)
        expected = brute_f1_threshold(scores.double().numpy(), labels.numpy())
        assert calibrate_threshold(scores, labels, "f1_max") == expected


@pytest.mark.parametrize("fpr", [0.0, 0.01, 0.1, 0.5])
def test_fpr_threshold_is_the_lowest_with_at_most_that_share_of_normals(fpr):
    for seed in range(4):
        scores, labels = scored(seed, ties=seed % 2 == 1)
        normal = np.sort(scores[labels == 0].double().numpy())
        threshold = calibrate_threshold(scores, labels, "fpr", fpr)
        assert (normal >= threshold).sum() <= math.floor(fpr * len(normal))
        # Any lower threshold reaching the next normal score would call too many normals.
        below = normal[normal < threshold].max()
        assert (normal >= below).sum() > math.floor(fpr * len(normal))


def test_without_anomalies_f1_max_falls_back_to_the_fpr_rule():
    scores = torch.linspace(0, 1, 101)
    labels = torch.zeros(101, dtype=torch.long)
    threshold = calibrate_threshold(scores, labels, "f1_max", fpr=0.05)
    assert threshold == calibrate_threshold(scores, labels, "fpr", fpr=0.05)
    assert int((scores.double() >= threshold).sum()) == 5


def test_bad_settings_are_refused():
    scores, labels = scored(0)
    with pytest.raises(ConfigError, match="threshold.method"):
        calibrate_threshold(scores, labels, "youden")
    with pytest.raises(ConfigError, match="threshold.fpr"):
        calibrate_threshold(scores, labels, "fpr", 1.0)
    with pytest.raises(ValueError, match="at least one normal"):
        calibrate_threshold(scores, torch.ones_like(labels))


def test_normalized_score_puts_the_median_at_0_and_the_threshold_at_0_5():
    detector = small_module().detector
    scores = torch.tensor([0.0, 1.0, 2.0, 3.0, 5.0, 9.0])
    assert torch.isnan(detector.normalized_score(scores)).all()
    assert not detector.verdict(scores).any()
    detector.set_threshold(3.0, normal_median=1.0)
    expected = torch.tensor([0.0, 0.0, 0.25, 0.5, 1.0, 1.0], dtype=torch.float64)
    assert torch.equal(detector.normalized_score(scores), expected)
    assert detector.verdict(scores).tolist() == [False, False, False, True, True, True]
    # A threshold below the median (a poor model's F1-max): 0.5 still splits the verdicts.
    detector.set_threshold(2.0, normal_median=5.0)
    normalized = detector.normalized_score(scores)
    assert torch.equal(normalized >= 0.5, detector.verdict(scores))


def test_validation_calibrates_the_threshold_it_saves_and_old_checkpoints_load(tiny_tree):
    datamodule = make_datamodule(tiny_tree, eval_batch_size=2)
    model = small_module()
    model.threshold = {"method": "fpr", "fpr": 0.0}
    quiet_trainer().validate(model, datamodule=datamodule)
    detector = model.detector.eval()
    # Scored again, independently, with the statistics that validation fitted.
    images, labels = [], []
    for batch in datamodule.val_dataloader():
        images.append(batch["image"])
        labels.append(batch["label"])
    with torch.no_grad():
        _, scores, _ = detector(torch.cat(images))
    labels = torch.cat(labels)
    normal = scores[labels == 0].double()
    assert labels.sum() > 0 and detector.has_threshold
    # fpr = 0: just above the highest normal score, so no held-out normal is called anomalous.
    assert normal.max() < detector.threshold <= normal.max() + 1e-6
    assert detector.normal_median.item() == pytest.approx(normal.median().item(), abs=1e-6)

    state = detector.state_dict()
    fresh = small_module().detector
    fresh.load_state_dict(state)
    assert fresh.threshold == detector.threshold
    old = {k: v for k, v in state.items() if k not in ("threshold", "normal_median")}
    older = small_module().detector
    older.load_state_dict(old)
    assert isinstance(older, AnomalyDetector) and not older.has_threshold
