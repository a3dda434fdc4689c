"""train.py and eval.py end to end, as a user runs them, on tiny built-in data."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly.metrics import METRIC_KEYS
from anomaly.visualization import COLOUR_BAR_WIDTH, PANEL_HEADER, PANEL_MIN_TILE
from tests.conftest import write_tree

ROOT = Path(__file__).resolve().parents[1]
DEFECTS = {"crack", "faulty_imprint", "poke", "scratch", "squeeze"}


TINY_RUN = {
    "data.image_size": 32,
    "data.synthetic.size": 32,
    "data.batch_size": 8,
    "trainer.max_epochs": 2,
    "trainer.limit_train_batches": 3,
    "callbacks.test_results.num_heatmaps": 1,
}


def tiny_settings(data_dir: Path, run_dir: Path | None, changes: dict | None = None) -> list[str]:
    """Overrides for a run of seconds: 32 px data, a few batches, two epochs.

    `changes` replaces settings of TINY_RUN by key, or drops them where the value is None;
    without a `run_dir` the run folder is left to Hydra (for multiruns).
    """
    settings = {**TINY_RUN, **(changes or {})}
    overrides = [f"{key}={value}" for key, value in settings.items() if value is not None]
    folder = [] if run_dir is None else [f"hydra.run.dir={run_dir}"]
    return [f"paths.data_dir={data_dir}", *folder, *overrides]


def run(
    script: str, *overrides: str, env: dict | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    command = [sys.executable, str(ROOT / script), *overrides]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, check=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def csv_threshold(run_dir: Path) -> str:
    """The last `val/threshold` a run logged."""
    with open(run_dir / "csv" / "metrics.csv") as handle:
        return [row["val/threshold"] for row in csv.DictReader(handle) if row["val/threshold"]][-1]


def check_outputs(run_dir: Path, model: str) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) >= set(METRIC_KEYS)
    assert all(0.0 <= metrics[key] <= 1.0 for key in METRIC_KEYS)
    assert set(metrics["per_defect"]) == DEFECTS
    assert (metrics["model"], metrics["category"], metrics["image_size"]) == (model, "capsule", 32)
    assert metrics["num_test_images"] == 132
    with open(run_dir / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 132
    assert set(rows[0]) == {"path", "defect_type", "label", "score", "normalized_score", "verdict"}
    assert {row["verdict"] for row in rows} <= {"normal", "anomalous"}
    assert {row["defect_type"] for row in rows} == DEFECTS | {"good"}
    assert all(row["label"] == str(int(row["defect_type"] != "good")) for row in rows)
    panels = sorted(p.name for p in (run_dir / "heatmaps").glob("*.png"))
    assert len(panels) == 6 and any(name.startswith("crack_") for name in panels)
    # The anomaly-map tiles share one colour scale that spans the test maps: not one flat colour.
    heat = [np.asarray(Image.open(run_dir / "heatmaps" / name)) for name in panels]
    width = (heat[0].shape[1] - COLOUR_BAR_WIDTH) // 5
    assert width >= PANEL_MIN_TILE
    colours = np.concatenate([h[PANEL_HEADER:, 2 * width : 3 * width].reshape(-1, 3) for h in heat])
    assert len(np.unique(colours, axis=0)) > 20
    assert (run_dir / "roc_image.png").is_file() and (run_dir / "roc_pixel.png").is_file()
    return metrics


@pytest.mark.parametrize("model", ["residual_ae", "sdc_ccm"])
def test_train_writes_every_output_and_eval_reproduces_metrics(tmp_path, data_dir, model):
    train_dir = tmp_path / "train"
    done = run("train.py", f"model={model}", *tiny_settings(data_dir, train_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = check_outputs(train_dir, model)
    assert (train_dir / "checkpoints" / "last.ckpt").is_file()
    best = [p for p in (train_dir / "checkpoints").glob("epoch_*.ckpt")]
    assert len(best) == 1
    eval_dir = tmp_path / "eval"
    done = run(
        "eval.py",
        f"ckpt_path={best[0]}",
        f"hydra.run.dir={eval_dir}",
        "callbacks.test_results.num_heatmaps=1",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((eval_dir / "metrics.json").read_text()) == metrics
    assert (eval_dir / "scores.csv").read_text() == (train_dir / "scores.csv").read_text()
    if model == "sdc_ccm":
        # Recalibrated on the same validation set, the checkpoint fits what it saved.
        again_dir = tmp_path / "recalibrated"
        done = run(
            "eval.py", f"ckpt_path={best[0]}", f"hydra.run.dir={again_dir}", "recalibrate=true"
        )
        assert done.returncode == 0, done.stderr[-3000:]
        again = json.loads((again_dir / "metrics.json").read_text())
        assert all(again[key] == pytest.approx(metrics[key], abs=1e-6) for key in METRIC_KEYS)
        assert "val/threshold" in (again_dir / "csv" / "metrics.csv").read_text()
        # A threshold setting of its own replaces the checkpoint's, and needs a recalibration.
        loose_dir = tmp_path / "loose"
        loose = [f"ckpt_path={best[0]}", f"hydra.run.dir={loose_dir}", "threshold.fpr=0.5"]
        refused = run("eval.py", *loose)
        assert refused.returncode != 0 and not (loose_dir / "metrics.json").exists()
        assert "threshold.fpr takes effect only with recalibrate=true" in refused.stderr
        done = run("eval.py", *loose, "recalibrate=true", "threshold.method=fpr")
        assert done.returncode == 0, done.stderr[-3000:]
        thresholds = [float(csv_threshold(folder)) for folder in (again_dir, loose_dir)]
        assert thresholds[1] < thresholds[0]  # half the held-out normals may reach it
        # Another image score replaces the checkpoint's with a recalibration, and tests as a run
        # trained with it does (the score does not change training: the same weights are kept).
        # Here the map's maximum (top_k=1) in place of the default top 1%.
        refused = run("eval.py", f"ckpt_path={best[0]}", "score.top_k=1")
        assert refused.returncode != 0
        assert "score.top_k takes effect only with recalibrate=true" in refused.stderr

        def recalibrated_as_trained(name: str, eval_override: str, train_change: dict) -> None:
            """The checkpoint re-tested with `eval_override` scores every test image as a run
            trained with `train_change` does, and not as the checkpoint's own run did."""
            eval_dir, trained_dir = tmp_path / name, tmp_path / f"trained_{name}"
            done = run(
                "eval.py",
                f"ckpt_path={best[0]}",
                f"hydra.run.dir={eval_dir}",
                "recalibrate=true",
                eval_override,
            )
            assert done.returncode == 0, done.stderr[-3000:]
            changes = tiny_settings(data_dir, trained_dir, train_change)
            done = run("train.py", f"model={model}", *changes)
            assert done.returncode == 0, done.stderr[-3000:]
            scores = (eval_dir / "scores.csv").read_text()
            assert scores == (trained_dir / "scores.csv").read_text(), name
            assert scores != (train_dir / "scores.csv").read_text(), name

        recalibrated_as_trained("maximum", "score.top_k=1", {"model.score.top_share": "null"})
        # So does another smoothing of the map (selection reads `val/loss`, not the map).
        recalibrated_as_trained("smooth", "anomaly_map.sigma=2", {"model.anomaly_map.sigma": "2"})
        # And another weighting of its error terms.
        recalibrated_as_trained("weights", "anomaly_map.ssim=0", {"model.anomaly_map.ssim": "0"})
        # The same checkpoint on another, real-layout category: its data keys replace the saved.
        write_tree(tmp_path / "real", category="widget")
        other_dir = tmp_path / "other"
        done = run(
            "eval.py",
            f"ckpt_path={best[0]}",
            f"hydra.run.dir={other_dir}",
            f"data.root={tmp_path / 'real'}",
            "data.category=widget",
        )
        assert done.returncode == 0, done.stderr[-3000:]
        other = json.loads((other_dir / "metrics.json").read_text())
        assert (other["category"], other["image_size"], other["num_test_images"]) == (
            "widget",
            32,
            7,
        )
        assert set(other["per_defect"]) == {"dent", "scratch"}
        assert not (tmp_path / "real" / "widget" / ".synthetic.json").exists()


def test_last_checkpoint_is_the_newest_epoch_even_when_the_best_is_older(tmp_path, data_dir):
    # Monitoring the step with mode=min makes epoch 0 the best for good; last.ckpt must still
    # move on to the final epoch, or a resumed run would silently repeat epochs.
    run_dir = tmp_path / "run"
    settings = [*tiny_settings(data_dir, run_dir, {"trainer.max_epochs": 3}), "test=false"]
    settings += ["callbacks.model_checkpoint.monitor=step", "callbacks.model_checkpoint.mode=min"]
    done = run("train.py", *settings)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = run_dir / "checkpoints"
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["epoch_000.ckpt", "last.ckpt"]
    last = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    best = torch.load(folder / "epoch_000.ckpt", map_location="cpu", weights_only=True)
    assert (last["epoch"], best["epoch"]) == (2, 0)
    assert last["global_step"] == 3 * best["global_step"]


def test_missing_data_root_is_one_line_error(tmp_path):
    done = run(
        "train.py",
        "data=mvtec",
        f"data.root={tmp_path / 'nowhere'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "nowhere" in last and "does not exist" in last


def test_eval_of_a_missing_checkpoint_is_one_line_error(tmp_path):
    done = run("eval.py", f"ckpt_path={tmp_path / 'no.ckpt'}", f"hydra.run.dir={tmp_path / 'r'}")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error:")
