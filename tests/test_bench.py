"""python -m anomaly.bench at a tiny size: every section and figure present and positive."""

from __future__ import annotations

import json
import math

from anomaly.bench import MODELS, PROFILES, main


def positive_numbers(rows: list[dict] | dict) -> list[float]:
    rows = [rows] if isinstance(rows, dict) else rows
    return [value for row in rows for value in row.values() if isinstance(value, float)]


def test_the_bench_writes_every_figure(tmp_path, capsys):
    output = tmp_path / "bench.json"
    assert main(["--profile", "tiny", "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    tiny = PROFILES["tiny"]
    assert set(results["dense"]) == {"matmul_gflops", "conv3x3_gflops"}
    assert {(r["model"], r["size"]) for r in results["train"]} == {
        (m, s) for m in MODELS for s in tiny.train_sizes
    }
    assert {"fp32", "fp32_channels_last", "bf16_channels_last"} <= {
        r["format"] for r in results["train"]
    }
    assert {r["kind"] for r in results["corrupt"]} == {"texture", "elastic", "both"}
    assert {r["path"] for r in results["corrupt"]} == {"per_sample", "batched"}
    assert [r["workers"] for r in results["loader"]] == list(tiny.loader_workers)
    assert {r["model"] for r in results["infer"]} == set(MODELS)
    assert [r["size"] for r in results["metrics"]] == list(tiny.metric_sizes)
    for section in ("dense", "train", "corrupt", "loader", "infer", "metrics"):
        values = positive_numbers(results[section])
        assert values, section
        # Peak memory may round to zero on the CPU; every rate and time is strictly positive.
        assert all(math.isfinite(v) and v >= 0 for v in values), section
    rates = [r[k] for r in results["train"] for k in ("images_per_s", "gflop_per_image")]
    assert all(rate > 0 for rate in rates)
    assert all(r["seconds"] > 0 for r in results["metrics"])
    assert "[train]" in capsys.readouterr().out
