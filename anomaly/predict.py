"""Score new images with a trained model: a verdict, a 0-1 score and a heatmap per image.

    python -m anomaly.predict ckpt_path=PATH input=PATH output=DIR [batch_size=16] [device=cpu]

`ckpt_path` is a checkpoint written by train.py, or a graph written by `python -m anomaly.export`
(`.onnx`, run by onnxruntime); both run the same `ImagePipeline`. `input` is an image file, a
folder (searched recursively) or a glob pattern. Each image is read as training reads it (any
size; RGB, grayscale, RGBA, palette, 16-bit), resized to the model's image size inside the
pipeline, and its map resized back to the image's own size for its overlay. Writes into
`output`: `predictions.csv` (path, score, normalized_score, verdict), `predictions.json` (the
same rows and the threshold) and `heatmaps/<name>.png`. A file that cannot be read is reported
on one line and skipped; the exit status is then 1.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from anomaly.callbacks import verdict_name
from anomaly.command_line import key_values, one_of
from anomaly.data.images import IMAGE_SUFFIXES, read_rgb
from anomaly.errors import ConfigError, DatasetError, NonFiniteError
from anomaly.export import INPUT_NAME, OUTPUT_NAMES, require
from anomaly.files import atomic_path, write_text
from anomaly.models.blocks import as_pair
from anomaly.pipeline import ImagePipeline
from anomaly.runtime import user_error_message
from anomaly.tasks import load_detector
from anomaly.visualization import colour_scale, save_prediction_overlay

USAGE = "usage: python -m anomaly.predict ckpt_path=PATH input=PATH output=DIR [key=value ...]"
FIELDS = ("path", "score", "normalized_score", "verdict")


@dataclass
class Settings:
    """The command line's key=value settings."""

    ckpt_path: str
    input: str
    output: str
    batch_size: int = 16
    device: str = "cpu"
    heatmaps: bool = True


def parse_settings(arguments: list[str]) -> Settings:
    """Settings from `key=value` arguments; a ConfigError names what is wrong."""
    values = key_values(
        arguments,
        known=tuple(Settings.__dataclass_fields__),
        required=("ckpt_path", "input", "output"),
        usage=USAGE,
    )
    batch_size = values.get("batch_size", "16")
    if not batch_size.isdigit() or int(batch_size) < 1:
        raise ConfigError(f"batch_size={batch_size!r} is out of range: an int >= 1")
    device = one_of(values, "device", ("cpu", "cuda"), "cpu")
    heatmaps = values.get("heatmaps", "true").lower()
    if heatmaps not in ("true", "false"):
        raise ConfigError(f"heatmaps={values['heatmaps']!r} is out of range: true or false")
    return Settings(
        ckpt_path=values["ckpt_path"],
        input=values["input"],
        output=values["output"],
        batch_size=int(batch_size),
        device=device,
        heatmaps=heatmaps == "true",
    )


@dataclass
class Model:
    """A trained model as prediction sees it, whichever runtime runs it.

    `run` maps uint8 images (B, H, W, 3) of one size to the `ImagePipeline` outputs as arrays:
    maps (B, h, w), scores, normalized scores and verdicts (B,).
    """

    image_size: tuple[int, int]
    threshold: float
    normal_median: float
    run: Callable[[np.ndarray], tuple[np.ndarray, ...]]

    @property
    def has_threshold(self) -> bool:
        return math.isfinite(self.threshold)


def checkpoint_model(path: str, device: str) -> Model:
    """A train.py checkpoint's pipeline, run by PyTorch on `device`."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but PyTorch sees no CUDA device")
    detector, config = load_detector(path)
    if config["model"].get("channels_last", False):
        detector.net.to(memory_format=torch.channels_last)  # as training and eval ran it
    pipeline = ImagePipeline(detector, as_pair(config["data"]["image_size"])).to(device)

    def run(images: np.ndarray) -> tuple[np.ndarray, ...]:
        with torch.inference_mode():
            outputs = pipeline(torch.from_numpy(images).to(device))
        return tuple(output.cpu().numpy() for output in outputs)

    threshold, median = float(detector.threshold), float(detector.normal_median)
    return Model(pipeline.image_size, threshold, median, run)


def onnx_model(path: str, device: str) -> Model:
    """An exported graph (`python -m anomaly.export`), run by onnxruntime on `device`."""
    onnxruntime = require("onnxruntime")
    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    if provider not in onnxruntime.get_available_providers():
        raise ConfigError(f"device={device}: this onnxruntime has no {provider}")
    if not Path(path).is_file():
        raise ConfigError(f"ckpt_path={path}: no such file")
    try:
        session = onnxruntime.InferenceSession(str(path), providers=[provider])
    except Exception as error:  # onnxruntime raises its own types for unreadable models
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"{path}: not a readable ONNX model ({reason})") from None
    properties = session.get_modelmeta().custom_metadata_map
    missing = [key for key in ("image_size", "threshold", "normal_median") if key not in properties]
    if [i.name for i in session.get_inputs()] != [INPUT_NAME]:
        missing.append(f"input {INPUT_NAME!r}")
    if missing:
        raise ConfigError(
            f"{path}: not a graph of python -m anomaly.export (it lacks {', '.join(missing)})"
        )

    def run(images: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(session.run(list(OUTPUT_NAMES), {INPUT_NAME: images}))

    size = tuple(int(side) for side in properties["image_size"].split(","))
    threshold, median = float(properties["threshold"]), float(properties["normal_median"])
    return Model(size, threshold, median, run)


def load_model(path: str, device: str) -> Model:
    """The model of a checkpoint, or of an exported `.onnx` graph."""
    if Path(path).suffix.lower() == ".onnx":
        return onnx_model(path, device)
    return checkpoint_model(path, device)


def input_files(pattern: str) -> list[Path]:
    """The image files named by a file, a folder (recursively) or a glob pattern, sorted."""
    path = Path(pattern)
    if path.is_file():
        return [path]
    if path.is_dir():
        candidates = path.rglob("*")
    else:
        candidates = (Path(p) for p in glob.glob(pattern, recursive=True))
    files = sorted(p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"input={pattern!r}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    return files


def heatmap_names(files: list[Path]) -> list[str]:
    """A unique PNG name per file: its path below the files' common folder, '/' as '__'."""
    resolved = [f.resolve() for f in files]
    common = Path(os.path.commonpath([f.parent for f in resolved]))
    return ["__".join(f.relative_to(common).with_suffix("").parts) + ".png" for f in resolved]


def score_images(model: Model, images: list[np.ndarray]) -> list[tuple[np.ndarray, ...]]:
    """(map, score, normalized score, verdict) per uint8 RGB image, run a size at a time."""
    by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, image in enumerate(images):
        by_size[image.shape].append(index)
    results: list[tuple[np.ndarray, ...]] = [()] * len(images)
    for indices in by_size.values():
        outputs = model.run(np.stack([images[i] for i in indices]))
        for row, index in enumerate(indices):
            results[index] = tuple(output[row] for output in outputs)
    return results


def predict(settings: Settings) -> int:
    """Scores every input image and writes the outputs; returns the number of unreadable files."""
    model = load_model(settings.ckpt_path, settings.device)
    files = input_files(settings.input)
    output = Path(settings.output)
    output.mkdir(parents=True, exist_ok=True)
    if not model.has_threshold:
        print("warning: this model has no calibrated threshold; verdicts are 'uncalibrated'")

    rows, failed, shown = [], 0, []
    names = dict(zip(files, heatmap_names(files), strict=True))
    progress = tqdm(total=len(files), unit="image", disable=None)
    for start in range(0, len(files), settings.batch_size):
        batch_files, images = [], []
        for path in files[start : start + settings.batch_size]:
            try:
                images.append(read_rgb(path))
                batch_files.append(path)
            except DatasetError as error:
                failed += 1
                print(f"error: {error}", file=sys.stderr)
        progress.update(len(files[start : start + settings.batch_size]))
        for path, image, (anomaly_map, score, normalized, anomalous) in zip(
            batch_files, images, score_images(model, images), strict=True
        ):
            if not (np.isfinite(anomaly_map).all() and np.isfinite(score)):
                raise NonFiniteError(f"{path}: non-finite anomaly map or score")
            row = {
                "path": str(path),
                "score": float(score),
                "normalized_score": float(normalized),
                "verdict": verdict_name(bool(anomalous), float(normalized)),
            }
            rows.append(row)
            if settings.heatmaps:
                shown.append((path, image, anomaly_map, row))
    progress.close()

    if shown:
        # One colour scale for the whole run, so heatmaps of different images compare.
        vmax = colour_scale([anomaly_map for _, _, anomaly_map, _ in shown])
        (output / "heatmaps").mkdir(exist_ok=True)
        for path, image, anomaly_map, row in shown:
            full = cv2.resize(anomaly_map, image.shape[1::-1], interpolation=cv2.INTER_LINEAR)
            title = f"{path.name}: score {row['score']:.4g}, {row['verdict']}"
            if model.has_threshold:
                title += f" (normalized {row['normalized_score']:.2f})"
            save_prediction_overlay(image, full, vmax, title, output / "heatmaps" / names[path])
    with atomic_path(output / "predictions.csv") as temporary, open(temporary, "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    summary = {
        "checkpoint": str(settings.ckpt_path),
        "image_size": list(model.image_size),
        "threshold": model.threshold if model.has_threshold else None,
        "normal_median": model.normal_median if model.has_threshold else None,
        "failed": failed,
        "predictions": rows,
    }
    write_text(output / "predictions.json", json.dumps(summary, indent=2) + "\n")
    anomalous = sum(row["verdict"] == "anomalous" for row in rows)
    print(f"{len(rows)} images scored, {anomalous} anomalous; results in {output}")
    if failed:
        print(f"error: {failed} of {len(files)} files could not be read", file=sys.stderr)
    return failed


def main(arguments: list[str] | None = None) -> int:
    """The command; returns the exit status (1 when an argument or some file was bad)."""
    try:
        failed = predict(parse_settings(sys.argv[1:] if arguments is None else arguments))
    except Exception as error:  # the user's errors in one line (files, settings, memory)
        message = user_error_message(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
