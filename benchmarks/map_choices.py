"""Score one trained checkpoint with several anomaly-map settings on a development copy of the
built-in data, drawn with another seed, so map defaults are never chosen on a reported test split.

The network runs once over the copy's train/good images (they fit the per-pixel normal
statistics of the standardized image score) and its test images; every row then only re-scores
the reconstructions. Prints one JSON line per setting:

    python benchmarks/map_choices.py --ckpt logs/train/runs/<run>/checkpoints/epoch_118.ckpt

The copy is generated into a temporary folder at the size the checkpoint's data used.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from anomaly.anomaly_map import AnomalyMap
from anomaly.data.mvtec import MVTecDataset, list_samples
from anomaly.data.synthetic import ensure_generated
from anomaly.detector import AnomalyDetector, NormalMapStatistics
from anomaly.errors import AnomalyError
from anomaly.metrics import auroc
from anomaly.tasks import load_detector

# (l2, ssim, gradient, sigma): equal weights as before, then rebalanced squared
# error, each at two smoothing widths.
SETTINGS = [
    (1.0, 1.0, 1.0, 2.0),
    (1.0, 1.0, 1.0, 1.0),
    (1.0, 0.0, 0.0, 1.0),
    (0.0, 1.0, 0.0, 1.0),
    (10.0, 1.0, 0.0, 2.0),
    (10.0, 1.0, 0.0, 1.0),
    (10.0, 1.0, 1.0, 1.0),
]
BATCH = 32


@torch.no_grad()
def reconstruct(net: nn.Module, dataset: MVTecDataset) -> tuple[torch.Tensor, ...]:
    """Images (N, 3, H, W), reconstructions, masks (N, H, W) and labels (N,) of a dataset."""
    samples = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([sample["image"] for sample in samples])
    outputs = torch.cat([net(images[i : i + BATCH]) for i in range(0, len(images), BATCH)])
    masks = torch.stack([sample["mask"][0] for sample in samples]).long()
    labels = torch.tensor([sample["label"] for sample in samples])
    return images, outputs, masks, labels


def score(setting: tuple, normal: tuple, test: tuple) -> dict:
    """Image and pixel AUROC of one map setting, standardized by the normal images' maps.

    `normal` holds the normal images and their reconstructions, `test` the test images, their
    reconstructions, masks and labels (see `reconstruct`).
    """
    l2, ssim, gradient, sigma = setting
    # The network already ran: the detector only maps and scores the reconstructions.
    detector = AnomalyDetector(
        nn.Identity(), AnomalyMap(sigma, l2=l2, ssim=ssim, gradient=gradient), None, True
    )
    statistics = NormalMapStatistics()
    statistics.update(detector.anomaly_map(*normal))
    detector.set_normal_statistics(*statistics.compute())
    images, outputs, masks, labels = test
    maps = detector.anomaly_map(images, outputs)
    scores = detector.score(maps)
    return {
        "l2": l2,
        "ssim": ssim,
        "gradient": gradient,
        "sigma": sigma,
        "image_auroc": round(float(auroc(scores, labels)), 4),
        "pixel_auroc": round(float(auroc(maps.flatten(), masks.flatten())), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="checkpoint written by train.py")
    parser.add_argument("--seed", type=int, default=1, help="seed of the development copy")
    args = parser.parse_args()
    try:
        detector, config = load_detector(args.ckpt)
    except AnomalyError as error:
        sys.exit(str(error))
    data = config["data"]
    synthetic_size = int((data.get("synthetic") or {}).get("size", 128))
    with tempfile.TemporaryDirectory() as folder:
        root = ensure_generated(Path(folder), "capsule", args.seed, synthetic_size).parent
        size = data["image_size"]
        train = MVTecDataset(list_samples(root, "capsule", "train"), size)
        test = MVTecDataset(list_samples(root, "capsule", "test"), size)
        normal_images, normal_outputs, _, _ = reconstruct(detector.net, train)
        test_results = reconstruct(detector.net, test)
    for setting in SETTINGS:
        print(json.dumps(score(setting, (normal_images, normal_outputs), test_results)))


if __name__ == "__main__":
    main()
