"""Experiment platform: sweeps and their report, wandb offline, DDP on CPU, resume, seeds.

Slow: each test runs train.py or eval.py as a user does, several times.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from anomaly.metrics import METRIC_KEYS
from tests.conftest import write_tree
from tests.test_train import ROOT, run, tiny_settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def run_sweep(sweep: Path, data_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """A multirun of tiny runs into `sweep` (one folder per job)."""
    settings = tiny_settings(data_dir, None)
    return run("train.py", "-m", *overrides, f"hydra.sweep.dir={sweep}", *settings)


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_multirun_gives_one_folder_per_job_and_one_report(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    done = run_sweep(sweep, data_dir, "model=residual_ae,sdc_ccm", "seed=0")
    assert done.returncode == 0, done.stderr[-3000:]
    models = {metrics_of(sweep / job)["model"] for job in ("0", "1")}
    assert models == {"residual_ae", "sdc_ccm"}
    report = subprocess.run(
        [sys.executable, "-m", "anomaly.report", str(sweep)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    lines = report.strip().splitlines()
    assert len(lines) == 4 and "residual_ae" in lines[2] + lines[3] and "sdc_ccm" in report
    assert (sweep / "report.csv").is_file()


def test_wandb_without_credentials_runs_offline_and_keeps_the_metrics(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    env = {"HOME": str(tmp_path), "WANDB_API_KEY": "", "WANDB_MODE": ""}
    done = run("train.py", "logger=wandb", *tiny_settings(data_dir, run_dir), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    # The offline log is wandb's binary record file; metric keys and JSON values are in it.
    records = runs[0].read_bytes()
    metrics = metrics_of(run_dir)
    assert json.dumps(metrics["image_auroc"]).encode() in records
    for key in (b"test/image_auroc", b"val/pixel_aupro", b"train/loss", b"best_checkpoint"):
        assert key in records, key
    assert list((runs[0].parent / "files" / "media" / "images").rglob("*.png"))  # heatmaps


def test_ddp_sim_test_metrics_equal_single_process(tmp_path):
    # An odd number of test images: a padding sampler would count one image twice.
    write_tree(
        tmp_path / "data",
        category="odd",
        num_train=10,
        num_good=3,
        defects={"dent": 2, "scratch": 2},
        size=(32, 32),
    )
    train_dir = tmp_path / "train"
    done = run(
        "train.py",
        "model=residual_ae",
        "data=mvtec",
        f"data.root={tmp_path / 'data'}",
        "data.category=odd",
        "data.image_size=32",
        "data.num_workers=0",
        "data.batch_size=4",
        "trainer.max_epochs=2",
        f"hydra.run.dir={train_dir}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = train_dir / "checkpoints" / "last.ckpt"
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    done = run("eval.py", f"ckpt_path={checkpoint}", f"hydra.run.dir={single}")
    assert done.returncode == 0, done.stderr[-3000:]
    done = run("eval.py", f"ckpt_path={checkpoint}", "trainer=ddp_sim", f"hydra.run.dir={ddp}")
    assert done.returncode == 0, done.stderr[-3000:]
    expected, got = metrics_of(single), metrics_of(ddp)
    assert got["num_test_images"] == expected["num_test_images"] == 7
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key
    for name, value in expected["per_defect"].items():
        assert got["per_defect"][name] == pytest.approx(value, abs=1e-6)
    assert (ddp / "scores.csv").read_text() == (single / "scores.csv").read_text()


def test_same_seed_twice_gives_identical_metrics(tmp_path, data_dir):
    first, second = tmp_path / "a", tmp_path / "b"
    for run_dir in (first, second):
        done = run("train.py", "seed=3", *tiny_settings(data_dir, run_dir))
        assert done.returncode == 0, done.stderr[-3000:]
    assert metrics_of(first) == metrics_of(second)
    resolved = (first / "config_resolved.yaml").read_text()
    assert "${" not in resolved and "seed: 3" in resolved


def as_in_a_terminal() -> None:
    """Ctrl+C's default action, as a job in the foreground of a terminal has it.

    A job that a non-interactive shell starts in the background (`pytest ... &` in a script)
    ignores SIGINT, and its children inherit that: train.py would then train on through the
    signal and exit 0.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_train(overrides: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "train.py"), *overrides]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=as_in_a_terminal,
    )


def wait_for_checkpoint(path: Path, process: subprocess.Popen, timeout: float = 300) -> dict:
    """Wait until `path` holds a complete checkpoint, and return it."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, "training ended before the checkpoint appeared"
        assert time.monotonic() < deadline, f"{path} did not appear"
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (FileNotFoundError, RuntimeError, EOFError):
            time.sleep(0.05)


def test_killed_run_resumed_equals_uninterrupted_run(tmp_path, data_dir):
    changes = {"data.batch_size": None, "trainer.max_epochs": 4}
    settings = tiny_settings(data_dir, None, changes)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    done = run("train.py", *settings, f"hydra.run.dir={whole}")
    assert done.returncode == 0, done.stderr[-3000:]
    process = start_train([*settings, f"hydra.run.dir={resumed}"])
    wait_for_checkpoint(resumed / "checkpoints" / "last.ckpt", process)
    process.kill()  # a hard kill: only the last end-of-epoch checkpoint survives
    process.wait()
    assert not (resumed / "metrics.json").exists()
    last = resumed / "checkpoints" / "last.ckpt"
    done = run(
        "train.py", *settings, f"hydra.run.dir={tmp_path / 'continued'}", f"ckpt_path={last}"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert metrics_of(tmp_path / "continued") == metrics_of(whole)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_without_results_and_a_rerun_in_the_same_folder_resumes(
    tmp_path, data_dir, stop
):
    run_dir = tmp_path / "job"
    changes = {"trainer.max_epochs": 3, "trainer.limit_train_batches": None}
    settings = tiny_settings(data_dir, run_dir, changes)
    process = start_train(settings)
    last = run_dir / "checkpoints" / "last.ckpt"
    steps_per_epoch = wait_for_checkpoint(last, process)["global_step"]  # after epoch 0
    time.sleep(0.5)  # into the second epoch's training steps
    process.send_signal(stop)
    # SIGTERM (preemption): 143; Ctrl+C: Lightning's graceful shutdown, 1.
    assert process.wait(timeout=120) == (128 + stop if stop == signal.SIGTERM else 1)
    assert not (run_dir / "metrics.json").exists()  # an interrupted run never looks finished
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert all(torch.isfinite(tensor).all() for tensor in saved["state_dict"].values())
    if stop == signal.SIGTERM:
        # Saved by the signal, mid second epoch: neither epoch end has this step.
        assert steps_per_epoch < saved["global_step"] < 2 * steps_per_epoch
    done = run("train.py", *settings)  # a requeued job: same command, same folder
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout + done.stderr
    assert metrics_of(run_dir)["num_test_images"] == 132


@pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
    reason="hydra-submitit-launcher (extra 'cluster') not installed",
)
def test_submitit_local_launcher_runs_a_sweep(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    done = run_sweep(
        sweep,
        data_dir,
        "hydra/launcher=submitit_local",
        "seed=1,2",
        "hydra.launcher.timeout_min=10",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert all((sweep / job / "metrics.json").is_file() for job in ("0", "1"))


def test_ddp_sim_under_multirun_keeps_one_folder_per_job(tmp_path, data_dir):
    sweep, logs = tmp_path / "sweep", tmp_path / "logs"
    done = run_sweep(sweep, data_dir, "trainer=ddp_sim", "seed=1,2", f"paths.log_dir={logs}")
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    assert all(metrics_of(sweep / job)["num_test_images"] == 132 for job in jobs)
    assert not logs.exists()  # no rank started a sweep or a run folder of its own
