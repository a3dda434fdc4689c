"""The floor any model must beat: distance to the mean normal image.

Anomaly map = per-pixel L2 distance over channels to the mean of the train/good images, smoothed
by a Gaussian of sigma 4 px; image score = maximum of the map. Prints one JSON line with the image
and pixel AUROC on the test split of an MVTec-layout category, read by the project's loader:

    python benchmarks/naive_baseline.py --root R --category C --size 128

Without --root the built-in synthetic set (generated at 128 px, as `data=synthetic` does) is
written into a temporary folder first.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from anomaly.data.mvtec import MVTecDataset, list_samples
from anomaly.data.synthetic import ensure_generated
from anomaly.metrics import auroc
from anomaly.similarity import gaussian_filter, gaussian_kernel1d

SMOOTH_SIGMA = 4.0


def evaluate(root: Path, category: str, size: int) -> dict:
    """Image and pixel AUROC of the naive baseline on one MVTec-layout category."""
    train = MVTecDataset(list_samples(root, category, "train"), size)
    test = MVTecDataset(list_samples(root, category, "test"), size)
    mean = torch.stack([sample["image"] for sample in train]).mean(0)  # (3, H, W)
    samples = [test[i] for i in range(len(test))]
    images = torch.stack([sample["image"] for sample in samples])  # (N, 3, H, W)
    masks = torch.stack([sample["mask"][0] for sample in samples]).long()  # (N, H, W)
    labels = torch.tensor([sample["label"] for sample in samples])
    distance = (images - mean).pow(2).sum(1).sqrt()  # (N, H, W)
    maps = gaussian_filter(distance.unsqueeze(1), gaussian_kernel1d(SMOOTH_SIGMA)).squeeze(1)
    return {
        "image_auroc": round(float(auroc(maps.flatten(1).amax(1), labels)), 4),
        "pixel_auroc": round(float(auroc(maps, masks)), 4),
        "n_test": len(samples),
        "n_anomalous": int(labels.sum()),
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="MVTec root (default: synthetic)")
    parser.add_argument("--category", default="capsule")
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.root
        if root is None:
            root = Path(scratch)
            ensure_generated(root, args.category, seed=0, size=128)
        result = evaluate(root, args.category, args.size)
    source = "synthetic" if args.root is None else str(args.root)
    print(json.dumps({"root": source, "category": args.category, "size": args.size, **result}))


if __name__ == "__main__":
    main(sys.argv[1:])
