"""Turn a sweep (or any folder of runs) into one results table: `python -m anomaly.report DIR`.

One row per run (every folder below DIR holding a `metrics.json`): the command-line overrides
that differ between runs as columns, then the metrics. When several categories are present, a
mean row per model follows, the shape of a paper's results table. Writes `report.md` and
`report.csv` into DIR and prints the markdown.
"""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import yaml

from anomaly.files import atomic_path, write_text
from anomaly.metrics import METRIC_KEYS


def read_overrides(run_dir: Path) -> dict[str, str]:
    """The `key=value` overrides Hydra recorded for a run (empty when there are none)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    overrides = yaml.safe_load(path.read_text()) or []
    pairs = (item.lstrip("+~").split("=", 1) for item in overrides)
    return {pair[0]: pair[1] if len(pair) == 2 else "" for pair in pairs}


def read_metrics(path: Path) -> dict:
    """The metrics of one `metrics.json`; ValueError naming the file when it is not one."""
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        reason = " ".join(str(error).split())
        raise ValueError(f"{path}: not a readable metrics file ({reason})") from None
    if not isinstance(metrics, dict):
        kind = type(metrics).__name__
        raise ValueError(f"{path}: not a metrics file (a JSON object expected, got {kind})")
    for key in METRIC_KEYS:
        value = metrics.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{path}: {key} is {value!r}, not a number or null")
    return metrics


def collect_runs(folder: Path) -> list[dict]:
    """Every run below `folder`: its overrides, model, category and metrics."""
    runs = []
    for path in sorted(folder.rglob("metrics.json")):
        metrics = read_metrics(path)
        runs.append(
            {
                "run": str(path.parent.relative_to(folder)) or ".",
                "overrides": read_overrides(path.parent),
                "model": metrics.get("model"),
                "category": metrics.get("category"),
                **{key: metrics.get(key) for key in METRIC_KEYS},
            }
        )
    return runs


def build_table(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: run, differing overrides, model, category, metrics; then model means."""
    keys = sorted({key for run in runs for key in run["overrides"]})
    # The model column comes from metrics.json: `model=...` overrides need no column of their own.
    varying = [
        k for k in keys if k != "model" and len({run["overrides"].get(k) for run in runs}) > 1
    ]
    header = ["run", *varying, "model", "category", *METRIC_KEYS]
    rows = []
    for run in runs:
        values = [f"{run[m]:.4f}" if run[m] is not None else "" for m in METRIC_KEYS]
        cells = [run["overrides"].get(key, "") for key in varying]
        rows.append([run["run"], *cells, str(run["model"]), str(run["category"]), *values])
    if len({run["category"] for run in runs}) > 1:
        by_model: dict[str, list[dict]] = defaultdict(list)
        for run in runs:
            by_model[str(run["model"])].append(run)
        for model, group in sorted(by_model.items()):
            means = []
            for metric in METRIC_KEYS:
                values = [run[metric] for run in group if run[metric] is not None]
                means.append(f"{sum(values) / len(values):.4f}" if values else "")
            rows.append(["mean", *[""] * len(varying), model, f"{len(group)} runs", *means])
    return header, rows


def to_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m anomaly.report DIR", file=sys.stderr)
        return 2
    folder = Path(argv[0])
    if not folder.is_dir():
        print(f"error: {folder}: folder does not exist", file=sys.stderr)
        return 1
    try:
        runs = collect_runs(folder)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not runs:
        print(f"error: {folder}: no metrics.json below this folder", file=sys.stderr)
        return 1
    header, rows = build_table(runs)
    markdown = to_markdown(header, rows)
    try:
        write_text(folder / "report.md", markdown)
        with (
            atomic_path(folder / "report.csv") as temporary,
            open(temporary, "w", newline="") as handle,
        ):
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
    except OSError as error:
        print(f"error: {error.filename or folder}: {error.strerror}", file=sys.stderr)
        return 1
    print(markdown, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
