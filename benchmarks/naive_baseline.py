"""The floor any model must beat: distance to the mean normal image.

Anomaly map = per-pixel L2 distance over channels to the mean of the train/good images, smoothed
by a Gaussian of sigma 4 px; image score = maximum of the map. Prints one JSON line with the image
and pixel AUROC on the test split of an MVTec-layout category:

    python benchmarks/naive_baseline.py --root R --category C --size 128

Without --root the built-in synthetic set is generated into a temporary folder first.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from anomaly.data.synthetic import ensure_generated
from anomaly.metrics import auroc

SMOOTH_SIGMA = 4.0


def load_image(path: Path, size: int) -> np.ndarray:
    """Image as float32 in [0, 1], shape (size, size, 3)."""
    image = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32) / 255.0


def load_mask(path: Path, size: int) -> np.ndarray:
    """Ground-truth mask as bool, shape (size, size)."""
    return np.asarray(Image.open(path).convert("L").resize((size, size), Image.NEAREST)) > 127


def evaluate(category_dir: Path, size: int) -> dict:
    """Image and pixel AUROC of the naive baseline on one MVTec-layout category folder.

    Args:
        category_dir: Folder holding train/good, test/<class> and ground_truth/<defect>.
        size: Side length the images are resized to.

    Returns:
        Dict with image_auroc, pixel_auroc and the test counts.
    """
    train = sorted((category_dir / "train" / "good").glob("*.png"))
    if not train:
        raise ValueError(f"no train/good/*.png images under {category_dir}")
    mean = np.mean([load_image(p, size) for p in train], axis=0)  # (H, W, 3)

    maps, masks, labels = [], [], []
    for class_dir in sorted(p for p in (category_dir / "test").iterdir() if p.is_dir()):
        for path in sorted(class_dir.glob("*.png")):
            distance = np.linalg.norm(load_image(path, size) - mean, axis=-1)  # (H, W)
            maps.append(gaussian_filter(distance, SMOOTH_SIGMA))
            if class_dir.name == "good":
                masks.append(np.zeros((size, size), dtype=bool))
            else:
                mask_path = category_dir / "ground_truth" / class_dir.name / f"{path.stem}_mask.png"
                masks.append(load_mask(mask_path, size))
            labels.append(class_dir.name != "good")
    if not maps:
        raise ValueError(f"no test/*/*.png images under {category_dir}")
    anomaly_maps = torch.from_numpy(np.stack(maps))  # (N, H, W)
    target_masks = torch.from_numpy(np.stack(masks)).long()  # (N, H, W)
    scores = anomaly_maps.flatten(1).amax(dim=1)  # (N,)
    return {
        "image_auroc": round(float(auroc(scores, torch.tensor(labels).long())), 4),
        "pixel_auroc": round(float(auroc(anomaly_maps, target_masks)), 4),
        "n_test": len(labels),
        "n_anomalous": int(sum(labels)),
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", type=Path, default=None, help="MVTec-layout root (default: synthetic)"
    )
    parser.add_argument("--category", default="capsule")
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.root
        if root is None:
            root = Path(scratch)
            ensure_generated(root, args.category, seed=0, size=args.size)
        result = evaluate(root / args.category, args.size)
    source = "synthetic" if args.root is None else str(args.root)
    print(json.dumps({"root": source, "category": args.category, "size": args.size, **result}))


if __name__ == "__main__":
    main(sys.argv[1:])
