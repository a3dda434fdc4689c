"""Anomaly-map and image-score settings of one trained checkpoint, judged on validation only.

The data of `benchmarks/validation_shapes.py`: the run's own held-out normal images, each
corrupted `--copies` times per shape (subtle blobs, faint scratches), with seeds apart from the
run's validation draws. The network runs once over them (levels matched as the detector does);
every setting then maps and scores those reconstructions again. One JSON line per map setting
(error-term weights, smoothing) and image score (maximum, or the mean of the largest share of
the map's pixels): per shape, image AUROC of the copies against the normals from the raw map and
from the standardized one (each normal standardized by the other normals' statistics, as
`score.standardize: auto` compares them), and pixel AUROC and AUPRO of the raw maps. Map and
score defaults are chosen here, never on test.

    python -m benchmarks.score_choices --ckpt <checkpoint> [--copies 8] [--seed 1]

(As a module from the repository root: it reads the data of `benchmarks.validation_shapes`.)
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import Tensor, nn

from anomaly.anomaly_map import AnomalyMap
from anomaly.detector import AnomalyDetector
from anomaly.metrics import pixel_metrics
from benchmarks.validation_shapes import (
    BATCH,
    SHAPES,
    corrupted_copies,
    held_out_normals,
    parse_arguments,
)

# (l2, ssim, gradient, sigma in pixels; None: the image's shorter side / 128, 1 at 128 px).
# Model II's default first, then its smoothing, then its weights; then Model I's default and its
# terms.
MAP_SETTINGS = [
    (10.0, 1.0, 0.0, None),
    (10.0, 1.0, 0.0, 0.0),
    (10.0, 1.0, 0.0, 0.5),
    (10.0, 1.0, 0.0, 1.0),
    (10.0, 1.0, 0.0, 2.0),
    (10.0, 1.0, 0.0, 4.0),
    (1.0, 0.0, 0.0, None),
    (0.0, 1.0, 0.0, None),
    (3.0, 1.0, 0.0, None),
    (30.0, 1.0, 0.0, None),
    (10.0, 1.0, 1.0, None),
    (1.0, 1.0, 1.0, None),
    (1.0, 1.0, 0.0, None),
    (0.0, 0.0, 1.0, None),
]
# The image score: the map's maximum (None), or the mean of this share of its largest pixels (at
# 128 px: 16, 49, 164 and 492 pixels).
TOP_SHARES = [None, 0.001, 0.003, 0.01, 0.03]


@torch.no_grad()
def reconstruct(detector: AnomalyDetector, images: list[np.ndarray]) -> tuple[Tensor, Tensor]:
    """Float32 (H, W, 3) images with their levels matched (N, 3, H, W), and the network's
    reconstructions of them."""
    matched, outputs = [], []
    for start in range(0, len(images), BATCH):
        chunk = np.stack(images[start : start + BATCH]).transpose(0, 3, 1, 2)
        inputs, _, _ = detector.match_levels(torch.from_numpy(np.ascontiguousarray(chunk)))
        matched.append(inputs)
        outputs.append(detector.net(inputs))
    return torch.cat(matched), torch.cat(outputs)


@torch.no_grad()
def setting_results(
    setting: tuple, matched: Tensor, outputs: Tensor, shapes: np.ndarray, masks: Tensor
) -> list[dict]:
    """One result per image score of one map setting. `shapes` names each image's shape
    ("normal" for the held-out normals), `masks` (N, H, W) marks the corrupted pixels."""
    l2, ssim, gradient, sigma = setting
    anomaly_map = AnomalyMap(sigma, l2=l2, ssim=ssim, gradient=gradient)
    maps = torch.cat(
        [
            anomaly_map(matched[i : i + BATCH], outputs[i : i + BATCH])
            for i in range(0, len(matched), BATCH)
        ]
    )
    normal = shapes == "normal"
    pixel = {}
    for shape in SHAPES:
        chosen = torch.from_numpy(normal | (shapes == shape))
        pixel[shape] = pixel_metrics(maps[chosen], masks[chosen])
    results = []
    for top_share in TOP_SHARES:
        scorer = AnomalyDetector(nn.Identity(), anomaly_map, top_share=top_share)
        result = {"l2": l2, "ssim": ssim, "gradient": gradient, "sigma": sigma}
        result["top_share"] = top_share
        for shape in SHAPES:
            chosen = torch.from_numpy(normal | (shapes == shape))
            labels = torch.from_numpy(shapes[chosen.numpy()] == shape).long()
            raw, standardized = scorer.compare_standardization(maps[chosen], labels)
            result[shape] = {
                "image_auroc_raw": round(raw, 4),
                "image_auroc_standardized": round(standardized, 4),
                "pixel_auroc": round(float(pixel[shape]["pixel_auroc"]), 4),
                "pixel_aupro": round(float(pixel[shape]["pixel_aupro"]), 4),
            }
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(__doc__.split("\n\n")[0], 8, argv)
    detector, normals, textures = held_out_normals(args.ckpt)
    images, masks, shapes = list(normals), [np.zeros(n.shape[:2], bool) for n in normals], []
    shapes += ["normal"] * len(normals)
    for shape in SHAPES:
        corrupted, shape_masks = corrupted_copies(normals, textures, shape, args.copies, args.seed)
        images += corrupted
        masks += shape_masks
        shapes += [shape] * len(corrupted)
    matched, outputs = reconstruct(detector, images)
    mask_tensor = torch.from_numpy(np.stack(masks)).long()
    for setting in MAP_SETTINGS:
        for result in setting_results(setting, matched, outputs, np.array(shapes), mask_tensor):
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
