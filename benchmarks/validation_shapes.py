"""How well a checkpoint finds synthetic anomalies of each shape on its run's held-out normals.

Validation data only: the held-out normal images of the run that wrote the checkpoint (its own
split of `train/good`, rebuilt from the checkpoint's config), each corrupted `--copies` times per
shape with a seed of its own, apart from the run's validation draws. Shapes, both centred on the
object: `blobs`, the subtle blob corruptions validation uses (`corrupt(subtle=True)`), and
`scratches`, thin bent lines as faint (`corrupt(subtle=True, scratch_prob=1)`). Prints one JSON
line per shape: image AUROC of the corrupted copies against the normals (the checkpoint's own
score), pixel AUROC and AUPRO over all of them. Corruption shapes are judged here, never on test.

    python benchmarks/validation_shapes.py --ckpt <checkpoint> [--copies 4] [--seed 1]
"""

import argparse
import json
import sys

import numpy as np
import torch
from hydra.utils import instantiate

from anomaly.data.corruptions import corrupt
from anomaly.data.foreground import foreground_mask
from anomaly.data.textures import TextureSource
from anomaly.detector import AnomalyDetector
from anomaly.errors import AnomalyError
from anomaly.metrics import auroc, pixel_metrics
from anomaly.tasks import load_detector

BATCH = 32
# Seeds the draws apart from the run's own validation anomalies.
STREAM = 7_001
SHAPES = {
    "blobs": {"subtle": True},
    "scratches": {"subtle": True, "scratch_prob": 1.0},
}


def corrupted_copies(
    images: list[np.ndarray], textures: TextureSource, shape: str, copies: int, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`copies` corrupted copies of each float32 (H, W, 3) image, and their masks."""
    corrupted, masks = [], []
    for index, image in enumerate(images):
        where = foreground_mask(image)
        for copy in range(copies):
            rng = np.random.default_rng([seed, STREAM, index, copy])
            result, mask = corrupt(image, rng, textures, 0.5, 0.5, where=where, **SHAPES[shape])
            corrupted.append(result)
            masks.append(mask)
    return corrupted, masks


@torch.no_grad()
def score(detector, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly maps (N, H, W) and image scores (N,) of float32 (H, W, 3) images."""
    maps, scores = [], []
    for start in range(0, len(images), BATCH):
        chunk = np.stack(images[start : start + BATCH]).transpose(0, 3, 1, 2)
        batch_maps, batch_scores, _ = detector(torch.from_numpy(np.ascontiguousarray(chunk)))
        maps.append(batch_maps[:, 0] if batch_maps.ndim == 4 else batch_maps)
        scores.append(batch_scores)
    return torch.cat(maps), torch.cat(scores)


def parse_arguments(description: str, copies: int, argv: list[str] | None) -> argparse.Namespace:
    """`--ckpt`, `--copies` (at least 1; `copies` by default) and `--seed`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by train.py")
    parser.add_argument("--copies", type=int, default=copies, help="corrupted copies per normal")
    parser.add_argument("--seed", type=int, default=1, help="seeds the corruptions")
    args = parser.parse_args(argv)
    if args.copies < 1:
        sys.exit(f"error: --copies must be at least 1, got {args.copies}")
    return args


def held_out_normals(path: str) -> tuple[AnomalyDetector, list[np.ndarray], TextureSource]:
    """A checkpoint's detector, its run's held-out normal images (float32 (H, W, 3)) and its
    textures; a one-line exit on a bad checkpoint or data."""
    try:
        detector, config = load_detector(path)
        datamodule = instantiate(config["data"])
        datamodule.setup("fit")
        held_out = datamodule.val_set.images
        normals = [held_out[i]["image"].numpy().transpose(1, 2, 0) for i in range(len(held_out))]
        return detector, normals, TextureSource(config["data"].get("dtd_root"))
    except AnomalyError as error:
        sys.exit(f"error: {error}")


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(__doc__.split("\n\n")[0], 4, argv)
    detector, normals, textures = held_out_normals(args.ckpt)
    normal_maps, normal_scores = score(detector, normals)
    normal_masks = torch.zeros_like(normal_maps, dtype=torch.long)
    for shape in SHAPES:
        images, masks = corrupted_copies(normals, textures, shape, args.copies, args.seed)
        maps, scores = score(detector, images)
        labels = torch.cat([torch.zeros(len(normals)), torch.ones(len(images))]).long()
        image_auroc = auroc(torch.cat([normal_scores, scores]), labels)
        all_masks = torch.cat([normal_masks, torch.from_numpy(np.stack(masks)).long()])
        pixel = pixel_metrics(torch.cat([normal_maps, maps]), all_masks)
        result = {
            "shape": shape,
            "normals": len(normals),
            "anomalies": len(images),
            "image_auroc": round(float(image_auroc), 4),
            "pixel_auroc": round(float(pixel["pixel_auroc"]), 4),
            "pixel_aupro": round(float(pixel["pixel_aupro"]), 4),
        }
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
