"""benchmarks/brightness_shift.py: its unshifted row against the run's own scores.csv, shifted
rows that move, and its one-line errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from benchmarks.brightness_shift import main, scaled


def test_the_unshifted_row_matches_the_runs_scores_and_a_shift_moves_them(trained, capsys):
    run_dir, best, data = trained
    assert main(["--ckpt", str(best), "--test", str(data / "test"), "--factors", "1", "0.5"]) == 0
    unshifted, darker = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    with open(run_dir / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    scores = np.array([float(row["score"]) for row in rows])
    labels = np.array([int(row["label"]) for row in rows])
    pairs = [(s, n) for s in scores[labels == 1] for n in scores[labels == 0]]
    expected = sum(1.0 if s > n else 0.5 if s == n else 0.0 for s, n in pairs) / len(pairs)
    assert unshifted["images"] == len(rows) == 132
    assert abs(unshifted["image_auroc"] - expected) < 1e-12
    verdicts = np.array([row["verdict"] == "anomalous" for row in rows])
    assert unshifted["normal_called_anomalous"] == verdicts[labels == 0].mean()
    assert unshifted["defective_called_anomalous"] == verdicts[labels == 1].mean()
    assert darker["factor"] == 0.5 and darker["image_auroc"] != unshifted["image_auroc"]


def test_levels_are_scaled_rounded_and_clipped():
    image = np.array([[[0, 100, 250]]], dtype=np.uint8)
    assert scaled(image, 1.1).tolist() == [[[0, 110, 255]]]
    assert scaled(image, 0.9).tolist() == [[[0, 90, 225]]]


def test_bad_inputs_are_one_line_errors(trained, tmp_path):
    _, best, data = trained
    missing = tmp_path / "none.ckpt"
    with pytest.raises(SystemExit) as stop:
        main(["--ckpt", str(missing), "--test", str(data / "test")])
    assert stop.value.code == f"error: {missing}: checkpoint file does not exist"
    with pytest.raises(SystemExit) as stop:
        main(["--ckpt", str(best), "--test", str(data / "test" / "good")])
    assert "needs normal images (in good/) and defective ones" in stop.value.code
    assert len(stop.value.code.splitlines()) == 1
