"""Does checkpoint selection track real quality? Every epoch checkpoint of one run scored on the
test split, once, after the run, against the validation metrics the run logged.

Train with every checkpoint kept (`callbacks.model_checkpoint.save_top_k=-1`), then

    python benchmarks/selection_correlation.py --run <run folder> [--every 5]

Prints one JSON line per scored epoch (its validation metrics from `csv/metrics.csv`, its test
image AUROC, pixel AUROC and AUPRO), then one line per validation metric: its Spearman rank
correlation across epochs with each test metric (val/loss negated, so that for every metric a
positive correlation means "better on validation, better on test"), and one line per selection
rule (the lowest val/loss, the highest val/pixel_aupro, the last epoch) with the test metrics of
the epoch it keeps. Reading the test split here chooses nothing: the run is over.
"""

import argparse
import csv
import json
import math
import re
import sys
from pathlib import Path

import torch
from scipy.stats import spearmanr

from anomaly.data.mvtec import MVTecDataset, list_samples
from anomaly.errors import AnomalyError
from anomaly.metrics import auroc, pixel_metrics
from anomaly.tasks import load_detector

BATCH = 32
# Validation metrics and their sign (+1: higher is better).
VALIDATION = {
    "val/loss": -1,
    "val/image_auroc": 1,
    "val/image_auroc_raw": 1,
    "val/image_auroc_standardized": 1,
    "val/pixel_auroc": 1,
    "val/pixel_aupro": 1,
}
TEST = ("image_auroc", "pixel_auroc", "pixel_aupro")


def validation_history(path: Path) -> dict[int, dict[str, float]]:
    """Each validated epoch's validation metrics, from a run's CSV log."""
    history: dict[int, dict[str, float]] = {}
    with open(path, newline="") as file:
        for row in csv.DictReader(file):
            values = {k: float(row[k]) for k in VALIDATION if row.get(k) not in (None, "")}
            if values:
                history.setdefault(int(row["epoch"]), {}).update(values)
    return history


def epoch_checkpoints(folder: Path) -> dict[int, Path]:
    """The epoch_NNN.ckpt files of a run's checkpoint folder, by epoch."""
    found = (re.fullmatch(r"epoch_(\d+)\.ckpt", path.name) for path in folder.iterdir())
    return {int(m.group(1)): folder / m.group(0) for m in found if m}


@torch.no_grad()
def test_metrics(path: Path, test_set: MVTecDataset | None) -> tuple[dict, MVTecDataset]:
    """Test image AUROC, pixel AUROC and AUPRO of one checkpoint (the test set is read once)."""
    detector, config = load_detector(path)
    data = config["data"]
    if test_set is None:
        records = list_samples(data["root"], data["category"], "test")
        test_set = MVTecDataset(records, data["image_size"])
    maps, scores, masks, labels = [], [], [], []
    for start in range(0, len(test_set), BATCH):
        samples = [test_set[i] for i in range(start, min(start + BATCH, len(test_set)))]
        batch_maps, batch_scores, _ = detector(torch.stack([s["image"] for s in samples]))
        maps.append(batch_maps)
        scores.append(batch_scores)
        masks.append(torch.stack([s["mask"][0] for s in samples]).long())
        labels.append(torch.tensor([s["label"] for s in samples]))
    maps, masks = torch.cat(maps), torch.cat(masks)
    pixel = pixel_metrics(maps, masks)
    result = {
        "image_auroc": float(auroc(torch.cat(scores), torch.cat(labels))),
        "pixel_auroc": float(pixel["pixel_auroc"]),
        "pixel_aupro": float(pixel["pixel_aupro"]),
    }
    return result, test_set


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a train.py run folder")
    parser.add_argument("--every", type=int, default=1, help="score every n-th epoch")
    args = parser.parse_args(argv)
    log, folder = args.run / "csv" / "metrics.csv", args.run / "checkpoints"
    for needed in (log, folder):
        if not needed.exists():
            sys.exit(f"error: {needed}: not found; is {args.run} a train.py run folder?")
    try:
        history = validation_history(log)
    except (KeyError, ValueError) as error:
        sys.exit(f"error: {log}: not a train.py CSV log ({type(error).__name__}: {error})")
    checkpoints = {e: p for e, p in epoch_checkpoints(folder).items() if e in history}
    if len(checkpoints) < 3:
        sys.exit(
            f"error: {folder}: {len(checkpoints)} validated epoch checkpoints, the correlation "
            "needs 3; train with callbacks.model_checkpoint.save_top_k=-1"
        )
    epochs = sorted(checkpoints)
    # What each rule keeps, over every checkpoint (not only the scored ones).
    kept = {
        "lowest val/loss": min(epochs, key=lambda e: history[e].get("val/loss", math.inf)),
        "highest val/pixel_aupro": max(
            epochs, key=lambda e: history[e].get("val/pixel_aupro", -math.inf)
        ),
        "last epoch": epochs[-1],
    }
    scored = sorted(set(epochs[:: max(1, args.every)]) | set(kept.values()))
    rows, test_set = {}, None
    try:
        for epoch in scored:
            metrics, test_set = test_metrics(checkpoints[epoch], test_set)
            test = {f"test/{name}": value for name, value in metrics.items()}
            rows[epoch] = {"epoch": epoch, **history[epoch], **test}
            print(json.dumps(rows[epoch]), flush=True)
    except AnomalyError as error:
        sys.exit(f"error: {error}")
    for key, sign in VALIDATION.items():
        usable = [row for row in rows.values() if key in row]
        line = {"validation": key, "epochs": len(usable)}
        for name in TEST:
            rho = spearmanr([sign * r[key] for r in usable], [r[f"test/{name}"] for r in usable])
            value = float(rho.statistic)
            line[f"spearman_{name}"] = round(value, 3) if math.isfinite(value) else None
        print(json.dumps(line))
    for rule, epoch in kept.items():
        test = {f"test/{name}": round(rows[epoch][f"test/{name}"], 4) for name in TEST}
        print(json.dumps({"selection": rule, "epoch": epoch, **test}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
