"""How a checkpoint's verdicts move when the light changes: the test images scaled in brightness.

Scores every image below `--test` (an MVTec-layout test folder: `<defect>/*.png`, `good` the
normal ones) through `anomaly.predict`'s pipeline, with its pixel levels multiplied by each
factor (0.9: 10% darker; rounded and clipped to 0-255), and prints one JSON line per factor:
image AUROC (pairwise, ties counted half) and the shares of normal and of defective images the
saved threshold calls anomalous. A line whose lighting drifts must not flag every image.

    python benchmarks/brightness_shift.py --ckpt <checkpoint> \
        --test ../shared/data/mvtec/capsule/test [--factors 0.9 1.0 1.1]
"""

import argparse
import json
import sys

import numpy as np

from anomaly.data.images import read_rgb
from anomaly.errors import AnomalyError
from anomaly.predict import checkpoint_model, input_files, score_images


def pairwise_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """The chance a defective image scores above a normal one, ties counted half."""
    positive, negative = scores[labels == 1], scores[labels == 0]
    greater = (positive[:, None] > negative[None, :]).mean()
    ties = (positive[:, None] == negative[None, :]).mean()
    return float(greater + 0.5 * ties)


def scaled(image: np.ndarray, factor: float) -> np.ndarray:
    """uint8 levels multiplied by `factor`, rounded and clipped."""
    return np.clip(np.rint(image.astype(np.float64) * factor), 0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by train.py")
    parser.add_argument("--test", required=True, help="a test folder: <defect>/<image>")
    parser.add_argument("--factors", nargs="+", type=float, default=[0.9, 1.0, 1.1])
    args = parser.parse_args(argv)
    try:
        files = input_files(args.test)
        labels = np.array([int(path.parent.name != "good") for path in files])
        if labels.all() or not labels.any():
            sys.exit(f"error: {args.test}: needs normal images (in good/) and defective ones")
        model = checkpoint_model(args.ckpt, "cpu")
        images = [read_rgb(path) for path in files]
    except AnomalyError as error:
        sys.exit(f"error: {error}")
    for factor in args.factors:
        rows = score_images(model, [scaled(image, factor) for image in images])
        scores = np.array([float(row[1]) for row in rows])
        anomalous = np.array([bool(row[3]) for row in rows])
        result = {
            "factor": factor,
            "images": len(images),
            "image_auroc": pairwise_auroc(scores, labels),
            "normal_called_anomalous": float(anomalous[labels == 0].mean()),
            "defective_called_anomalous": float(anomalous[labels == 1].mean()),
        }
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
