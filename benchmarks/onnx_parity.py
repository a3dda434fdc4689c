"""How closely an exported graph follows its checkpoint on a folder of images.

Exports the checkpoint into a temporary folder, runs both through `anomaly.predict`'s models
(PyTorch and onnxruntime, the same `ImagePipeline`) over every image below `--input`, and prints
one JSON line: the largest map difference, the largest and median score differences (absolute
and relative to the score), the export check's score tolerance and the verdicts that differ.

    python benchmarks/onnx_parity.py --ckpt <checkpoint> --input ../shared/data/mvtec/capsule/test
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from anomaly.data.images import read_rgb
from anomaly.errors import AnomalyError
from anomaly.export import export_onnx, metadata, score_tolerance
from anomaly.models.blocks import as_pair
from anomaly.pipeline import ImagePipeline
from anomaly.predict import checkpoint_model, input_files, onnx_model, score_images
from anomaly.tasks import load_detector


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by train.py")
    parser.add_argument("--input", required=True, help="an image, a folder or a glob")
    args = parser.parse_args()
    try:
        detector, config = load_detector(args.ckpt)
        pipeline = ImagePipeline(detector, as_pair(config["data"]["image_size"]))
        images = [read_rgb(path) for path in input_files(args.input)]
        with tempfile.TemporaryDirectory() as folder:
            graph = Path(folder) / "model.onnx"
            export_onnx(pipeline, graph, metadata(pipeline, config["model"]["name"], args.ckpt))
            by_runtime = [
                score_images(model, images)
                for model in (checkpoint_model(args.ckpt, "cpu"), onnx_model(str(graph), "cpu"))
            ]
    except AnomalyError as error:
        sys.exit(f"error: {error}")
    torch_rows, onnx_rows = by_runtime
    maps = max(float(np.abs(a[0] - b[0]).max()) for a, b in zip(torch_rows, onnx_rows, strict=True))
    scores = np.array([float(a[1]) for a in torch_rows])
    gaps = np.abs(scores - np.array([float(b[1]) for b in onnx_rows]))
    verdicts = sum(bool(a[3]) != bool(b[3]) for a, b in zip(torch_rows, onnx_rows, strict=True))
    result = {
        "model": config["model"]["name"],
        "images": len(images),
        "max_map_difference": maps,
        "max_score_difference": float(gaps.max()),
        "median_score_difference": float(np.median(gaps)),
        "max_relative_score_difference": float((gaps / np.maximum(np.abs(scores), 1.0)).max()),
        "score_range": [float(scores.min()), float(scores.max())],
        "score_tolerance": score_tolerance(detector),
        "verdicts_differing": int(verdicts),
        "anomalous": int(sum(bool(b[3]) for b in onnx_rows)),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
