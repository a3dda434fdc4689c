"""benchmarks/validation_verdicts.py: the validation it rebuilds reproduces the run's threshold."""

from __future__ import annotations

import json

import pytest

from benchmarks.validation_verdicts import main


def test_the_rebuilt_validation_reproduces_the_saved_threshold(trained, capsys):
    _, best, _ = trained
    assert main(["--ckpt", str(best)]) == 0
    (result,) = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    # The run calibrated with the default method, fpr, on the same validation scores.
    assert result["saved"]["threshold"] == pytest.approx(result["fpr"]["threshold"], rel=1e-6)
    assert result["fpr"]["normals_called_anomalous"] <= 0.01
    for method in ("saved", "f1_max", "fpr"):
        assert 0.0 <= result[method]["anomalies_called_anomalous"] <= 1.0


def test_a_missing_checkpoint_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="error: .*missing.ckpt"):
        main(["--ckpt", str(tmp_path / "missing.ckpt")])
