"""benchmarks/selection_correlation.py: every epoch's test metrics, the rank correlations and the
epoch each selection rule keeps, checked against the run's own test of its best checkpoint."""

from __future__ import annotations

import json

import pytest
from scipy.stats import rankdata

from benchmarks.selection_correlation import main
from tests.test_train import run, tiny_settings


def spearman(a: list[float], b: list[float]) -> float:
    """Pearson correlation of the ranks (ties averaged), written out."""
    ra, rb = rankdata(a), rankdata(b)
    ma, mb = ra.mean(), rb.mean()
    cov = ((ra - ma) * (rb - mb)).sum()
    return cov / (((ra - ma) ** 2).sum() * ((rb - mb) ** 2).sum()) ** 0.5


@pytest.mark.slow  # a 4-epoch run, then every epoch scored on test: about a minute
def test_every_epoch_is_scored_and_the_kept_epoch_matches_the_runs_test(tmp_path, capsys):
    run_dir = tmp_path / "run"
    changes = {
        "trainer.max_epochs": 4,
        "callbacks.model_checkpoint.save_top_k": -1,
        "callbacks.validation_schedule.max_share": 1.0,
    }
    done = run("train.py", *tiny_settings(tmp_path / "data", run_dir, changes))
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["--run", str(run_dir)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    epochs = [line for line in lines if "epoch" in line and "selection" not in line]
    correlations = {line["validation"]: line for line in lines if "validation" in line}
    kept = {line["selection"]: line for line in lines if "selection" in line}
    assert [row["epoch"] for row in epochs] == [0, 1, 2, 3]
    # Every validation logs both scores' image AUROC, and they are correlated too.
    for key in ("val/image_auroc_raw", "val/image_auroc_standardized"):
        assert all(0.0 <= row[key] <= 1.0 for row in epochs) and correlations[key]["epochs"] == 4
    # The run tested the checkpoint with the lowest val/loss (the model's selection rule).
    tested = json.loads((run_dir / "metrics.json").read_text())
    best = min(epochs, key=lambda row: row["val/loss"])
    assert kept["lowest val/loss"]["epoch"] == best["epoch"]
    for name in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert abs(best[f"test/{name}"] - tested[name]) < 1e-6, name
    assert kept["last epoch"]["epoch"] == 3
    loss = [-row["val/loss"] for row in epochs]
    image = [row["test/image_auroc"] for row in epochs]
    assert correlations["val/loss"]["spearman_image_auroc"] == pytest.approx(
        spearman(loss, image), abs=1e-3
    )


def test_a_run_without_epoch_checkpoints_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit) as stop:
        main(["--run", str(tmp_path)])
    log = tmp_path / "csv" / "metrics.csv"
    assert stop.value.code == f"error: {log}: not found; is {tmp_path} a train.py run folder?"


def test_a_malformed_log_is_a_one_line_error_naming_it(tmp_path):
    (tmp_path / "csv").mkdir()
    (tmp_path / "checkpoints").mkdir()
    log = tmp_path / "csv" / "metrics.csv"
    log.write_text("epoch,val/loss\nfirst,0.5\n")
    with pytest.raises(SystemExit) as stop:
        main(["--run", str(tmp_path)])
    assert stop.value.code.startswith(f"error: {log}: not a train.py CSV log (ValueError")
    assert len(stop.value.code.splitlines()) == 1
