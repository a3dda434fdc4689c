"""benchmarks/validation_shapes.py: its figures against a pairwise AUROC written out over the same
held-out normals and copies, the shapes it draws, and its one-line errors (and those of
benchmarks/score_choices.py, which reads the same data)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from hydra.utils import instantiate

from anomaly.data.textures import TextureSource
from anomaly.tasks import load_detector
from benchmarks.score_choices import main as score_choices_main
from benchmarks.validation_shapes import corrupted_copies, main, score


def pairwise_auroc(normal: np.ndarray, anomalous: np.ndarray) -> float:
    greater = (anomalous[:, None] > normal[None, :]).mean()
    return float(greater + 0.5 * (anomalous[:, None] == normal[None, :]).mean())


def test_each_shape_is_scored_on_the_runs_held_out_normals(trained, capsys):
    _, best, _ = trained
    assert main(["--ckpt", str(best), "--copies", "2", "--seed", "3"]) == 0
    lines = {row["shape"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(lines) == {"blobs", "scratches"}
    detector, config = load_detector(best)
    datamodule = instantiate(config["data"])
    datamodule.setup("fit")
    held_out = datamodule.val_set.images
    assert len(held_out) < len(datamodule.train_set)  # the held-out split, not the training one
    textures = TextureSource(config["data"].get("dtd_root"))
    normals = [held_out[i]["image"].numpy().transpose(1, 2, 0) for i in range(len(held_out))]
    _, normal_scores = score(detector, normals)
    for shape, line in lines.items():
        images, masks = corrupted_copies(normals, textures, shape, 2, 3)
        assert line["normals"] == len(normals) and line["anomalies"] == 2 * len(normals)
        assert all(mask.any() for mask in masks)
        _, scores = score(detector, images)
        expected = pairwise_auroc(normal_scores.numpy(), scores.numpy())
        assert line["image_auroc"] == pytest.approx(expected, abs=1e-4)
        assert 0.0 <= line["pixel_auroc"] <= 1.0 and 0.0 <= line["pixel_aupro"] <= 1.0
    # Scratches are thin: a 3 x 3 opening removes nearly all of their pixels.
    _, masks = corrupted_copies(normals, textures, "scratches", 2, 3)
    kernel = np.ones((3, 3), np.uint8)
    kept = sum(cv2.morphologyEx(m.astype(np.uint8), cv2.MORPH_OPEN, kernel).sum() for m in masks)
    assert kept <= 0.2 * sum(m.sum() for m in masks)


@pytest.mark.parametrize("script", [main, score_choices_main])
def test_bad_inputs_are_one_line_errors(trained, tmp_path, script):
    _, best, _ = trained
    missing = tmp_path / "none.ckpt"
    with pytest.raises(SystemExit) as stop:
        script(["--ckpt", str(missing)])
    assert stop.value.code == f"error: {missing}: checkpoint file does not exist"
    with pytest.raises(SystemExit) as stop:
        script(["--ckpt", str(best), "--copies", "0"])
    assert stop.value.code == "error: --copies must be at least 1, got 0"
