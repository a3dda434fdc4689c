"""The fault matrix end to end (README, "When things go wrong"): train.py on reruns, divergence,
read-only folders and small datasets, each an exit status and one line, nothing lost."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import write_tree
from tests.test_run_folder import READ_ONLY, cannot_create
from tests.test_train import run, tiny_settings


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def one_line_error(done) -> str:
    """The `error: ...` line of a run that failed as a user error (exit 1, no traceback)."""
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """The bytes of every file in a run folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_reruns_never_overwrite_a_run_and_the_same_settings_resume_it(tmp_path, data_dir):
    folder = tmp_path / "run"
    settings = tiny_settings(data_dir, folder)
    done = run("train.py", *settings)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (folder / ".hydra" / "overrides.yaml").is_file()
    finished = snapshot(folder)

    # A finished run: refused, with other settings or the same ones; not one byte changes.
    for changes in ([], ["model.optimizer.lr=0.5"], ["model=residual_ae"]):
        error = one_line_error(run("train.py", *settings, *changes))
        assert "holds a finished run (metrics.json)" in error
        assert snapshot(folder) == finished

    # An unfinished run (no metrics.json): other settings are refused, naming the change ...
    (folder / "metrics.json").unlink()
    unfinished = snapshot(folder)
    error = one_line_error(run("train.py", *settings, "model.optimizer.lr=0.5"))
    assert "holds a run with other settings (model.optimizer.lr: 0.002 -> 0.5)" in error
    assert snapshot(folder) == unfinished

    # ... the same settings continue it, and the CSV history of the first run stays.
    done = run("train.py", *settings)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "continuing it" in done.stderr + done.stdout
    history = unfinished["csv/metrics.csv"].decode().splitlines()
    assert (folder / "csv" / "metrics.csv").read_text().splitlines()[: len(history)] == history
    assert (folder / "config_resolved.yaml").read_bytes() == unfinished["config_resolved.yaml"]
    assert json.loads((folder / "metrics.json").read_text()) == json.loads(finished["metrics.json"])


def test_a_diverging_run_stops_at_the_step_and_writes_no_non_finite_checkpoint(tmp_path, data_dir):
    folder = tmp_path / "run"
    done = run("train.py", *tiny_settings(data_dir, folder), "model.optimizer.lr=1e10")
    error = one_line_error(done)
    # The loss, or (batch normalization) the running statistics, are the first to overflow.
    assert "training diverged: " in error and " (optimizer step " in error
    assert "lower model.optimizer.lr (now 1e+10)" in error
    assert not (folder / "metrics.json").exists()
    for path in (folder / "checkpoints").glob("*.ckpt"):
        weights = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(tensor).all() for tensor in weights.values()), path


@pytest.mark.skipif(not cannot_create(READ_ONLY), reason="no read-only /sys here")
def test_a_read_only_output_folder_is_one_line_before_anything_runs(data_dir):
    error = one_line_error(run("train.py", *tiny_settings(data_dir, READ_ONLY)))
    assert f"error: {READ_ONLY}: output folder cannot be written" in error


@pytest.mark.skipif(
    not READ_ONLY.parent.is_dir() or not cannot_create(READ_ONLY), reason="no read-only /sys here"
)
@pytest.mark.parametrize("sweep", [False, True], ids=["run", "multirun"])
def test_the_default_output_folder_is_checked_before_anything_runs(sweep):
    # Started in a read-only folder, the default folder (logs/ under it) cannot be made; the
    # default reads hydra:runtime.cwd, which the check must resolve rather than skip.
    started_in = READ_ONLY.parent
    done = run("train.py", *(["-m", "seed=0,1"] if sweep else []), cwd=started_in)
    error = one_line_error(done)
    folder = started_in / "logs" / "train" / ("multiruns" if sweep else "runs")
    assert error.startswith(f"error: {folder}/") and "output folder cannot be written" in error
    assert "HydraConfig was not set" not in done.stderr


def test_a_handful_of_normal_images_still_gives_finite_scores(tmp_path):
    # 6 normal images: 3 held out for the normal-map statistics (at least), 3 to train on.
    write_tree(tmp_path / "data", num_train=6, num_good=3, size=(32, 32))
    folder = tmp_path / "run"
    overrides = [
        "data=mvtec",
        f"data.root={tmp_path / 'data'}",
        "data.category=widget",
        "data.image_size=32",
        "data.batch_size=2",
        "trainer.max_epochs=1",
        f"hydra.run.dir={folder}",
    ]
    done = run("train.py", *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(folder / "scores.csv") as handle:
        scores = [float(row["score"]) for row in csv.DictReader(handle)]
    assert len(scores) == 7 and all(math.isfinite(score) for score in scores)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["image_auroc"] is not None

    write_tree(tmp_path / "fewer", num_train=3, size=(32, 32))
    overrides[1] = f"data.root={tmp_path / 'fewer'}"
    overrides[-1] = f"hydra.run.dir={tmp_path / 'fewer_run'}"
    error = one_line_error(run("train.py", *overrides))
    assert "3 normal images are too few; validation holds out at least 3" in error
