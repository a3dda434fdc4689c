"""python -m anomaly.report: one table from a folder of runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from anomaly.metrics import METRIC_KEYS
from anomaly.report import build_table, collect_runs


def fake_run(folder: Path, model: str, category: str, image_auroc: float, overrides: list[str]):
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    metrics = {
        "image_auroc": image_auroc,
        "pixel_auroc": 0.9,
        "pixel_aupro": 0.8,
        "image_f1_max": 0.7,
        "pixel_f1_max": 0.3,
        "model": model,
        "category": category,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_table_has_differing_overrides_and_model_means(tmp_path):
    fake_run(
        tmp_path / "0",
        "residual_ae",
        "capsule",
        0.6,
        ["model=residual_ae", "seed=1", "data.category=capsule"],
    )
    fake_run(
        tmp_path / "1",
        "residual_ae",
        "pill",
        0.8,
        ["model=residual_ae", "seed=1", "data.category=pill"],
    )
    fake_run(
        tmp_path / "2",
        "sdc_ccm",
        "capsule",
        0.9,
        ["model=sdc_ccm", "seed=1", "data.category=capsule"],
    )
    header, rows = build_table(collect_runs(tmp_path))
    # "seed" is the same in every run, so it is no column; "model" comes from metrics.json.
    assert header == ["run", "data.category", "model", "category", *METRIC_KEYS]
    assert [row[0] for row in rows] == ["0", "1", "2", "mean", "mean"]
    image = header.index("image_auroc")
    assert [row[image] for row in rows] == ["0.6000", "0.8000", "0.9000", "0.7000", "0.9000"]
    assert rows[3][header.index("category")] == "2 runs"


def test_command_writes_markdown_and_csv(tmp_path):
    fake_run(tmp_path / "a", "sdc_ccm", "capsule", 0.95, ["model=sdc_ccm"])
    done = subprocess.run(
        [sys.executable, "-m", "anomaly.report", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0 and "| a |" in done.stdout and "0.9500" in done.stdout
    assert (tmp_path / "report.md").read_text() == done.stdout
    assert (tmp_path / "report.csv").read_text().splitlines()[0].startswith("run,")


def test_command_errors_are_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "anomaly.report", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "does not exist" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "anomaly.report", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1 and "no metrics.json" in done.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not a readable metrics file"),
        ("[0.9, 0.8]", r"not a metrics file \(a JSON object expected, got list\)"),
        ('{"image_auroc": "high"}', "image_auroc is 'high', not a number or null"),
        ('{"image_auroc": true}', "image_auroc is True, not a number or null"),
    ],
)
def test_a_malformed_metrics_file_is_one_line_naming_it(tmp_path, content, message):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(content)
    done = subprocess.run(
        [sys.executable, "-m", "anomaly.report", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert re.search(f"run/metrics.json: {message}", done.stderr), done.stderr
    assert not (tmp_path / "report.md").exists()


def test_side_by_side_runs_every_row_into_its_folder_then_one_report(tmp_path):
    # A row that fails (a bad setting) is named; the others still make the report.
    from tests.test_train import ROOT, tiny_settings

    def row(seed: int) -> str:
        # Each its own data folder: two runs must not generate the built-in set into one.
        settings = tiny_settings(tmp_path / f"data_{seed}", None, {"trainer.max_epochs": 1})
        return " ".join([f"seed_{seed}", *settings, f"seed={seed}"])

    out = tmp_path / "runs"
    rows = [row(0), row(1), "broken model.score.top_k=0"]
    script = ROOT / "benchmarks" / "side_by_side.sh"
    done = subprocess.run(
        ["bash", str(script), str(out), "2", *rows],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert sorted(done.stdout.split("\n")[:2]) == ["done: seed_0", "done: seed_1"]
    assert f"failed: broken (see {out}/broken.log)" in done.stderr
    table = (out / "report.md").read_text()
    for seed in (0, 1):
        metrics = json.loads((out / f"seed_{seed}" / "metrics.json").read_text())
        line = next(row for row in table.splitlines() if row.startswith(f"| seed_{seed} |"))
        assert f"{metrics['image_auroc']:.4f}" in line
