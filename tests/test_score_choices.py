"""benchmarks/score_choices.py: its figures against the detector's own forward pass and a
leave-one-out standardization written out here, over the same held-out normals and copies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from anomaly.anomaly_map import AnomalyMap
from anomaly.data.textures import TextureSource
from anomaly.detector import AnomalyDetector
from anomaly.tasks import load_detector
from benchmarks.score_choices import MAP_SETTINGS, TOP_SHARES, main
from benchmarks.validation_shapes import corrupted_copies, score


def pairwise_auroc(normal: np.ndarray, anomalous: np.ndarray) -> float:
    greater = (anomalous[:, None] > normal[None, :]).mean()
    return float(greater + 0.5 * (anomalous[:, None] == normal[None, :]).mean())


def leave_one_out_scores(normal_maps: torch.Tensor, maps: torch.Tensor, top_k: int | None):
    """Standardized scores: each normal map by the other normals, the anomalous by all of them;
    the maximum, or the mean of the `top_k` largest pixels."""

    def standardized_score(image_map, others):
        mean, std = others.mean(0), others.std(0, unbiased=False)
        flat = ((image_map - mean) / (std + std.mean())).flatten()
        return float(flat.max() if top_k is None else flat.topk(top_k).values.mean())

    count = len(normal_maps)
    normal = [
        standardized_score(normal_maps[i], normal_maps[torch.arange(count) != i])
        for i in range(count)
    ]
    anomalous = [standardized_score(m, normal_maps) for m in maps]
    return np.array(normal), np.array(anomalous)


def test_each_setting_is_scored_as_the_detector_scores_it(trained, capsys):
    _, best, _ = trained
    assert main(["--ckpt", str(best), "--copies", "2", "--seed", "3"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == len(MAP_SETTINGS) * len(TOP_SHARES)
    detector, config = load_detector(best)
    datamodule = instantiate(config["data"])
    datamodule.setup("fit")
    held_out = datamodule.val_set.images
    normals = [held_out[i]["image"].numpy().transpose(1, 2, 0) for i in range(len(held_out))]
    textures = TextureSource(config["data"].get("dtd_root"))
    checked = 0
    for row in rows:
        setting = (row["l2"], row["ssim"], row["gradient"], row["sigma"])
        checked_scores = (None, 0.01)
        if setting not in MAP_SETTINGS[:2] or row["top_share"] not in checked_scores:
            continue
        # The whole forward pass (levels matched, network, map, raw score) with this setting.
        l2, ssim, gradient, sigma = setting
        scorer = AnomalyDetector(
            detector.net,
            AnomalyMap(sigma, l2=l2, ssim=ssim, gradient=gradient),
            top_share=row["top_share"],
            normalize_levels=detector.normalize_levels,
        )
        if detector.has_reference_levels:
            scorer.set_reference_levels(*detector.reference_levels.tolist())
        normal_maps, normal_scores = score(scorer, normals)
        pixels = normal_maps[0].numel()
        top_k = None if row["top_share"] is None else max(1, round(row["top_share"] * pixels))
        for shape in ("blobs", "scratches"):
            images, _ = corrupted_copies(normals, textures, shape, 2, 3)
            maps, scores = score(scorer, images)
            raw = pairwise_auroc(normal_scores.numpy(), scores.numpy())
            assert row[shape]["image_auroc_raw"] == pytest.approx(raw, abs=1e-4)
            normal_std, anomalous_std = leave_one_out_scores(normal_maps, maps, top_k)
            standardized = pairwise_auroc(normal_std, anomalous_std)
            assert row[shape]["image_auroc_standardized"] == pytest.approx(standardized, abs=1e-4)
            assert 0.0 <= row[shape]["pixel_auroc"] <= 1.0
            assert 0.0 <= row[shape]["pixel_aupro"] <= 1.0
        checked += 1
    assert checked == 4


@pytest.mark.parametrize("model", ["residual_ae", "sdc_ccm"])
def test_each_models_default_map_is_among_the_settings(model):
    """A model's own map is the row its alternatives are judged against."""
    config = OmegaConf.load(Path(__file__).parents[1] / "conf" / "model" / f"{model}.yaml")
    weights = config.anomaly_map
    assert weights.l1 == 0.0  # the settings have no l1 term
    default = (weights.l2, weights.ssim, weights.gradient, weights.sigma)
    assert default in MAP_SETTINGS
