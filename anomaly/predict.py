"""Score new images with a trained checkpoint: a verdict, a 0-1 score and a heatmap per image.

    python -m anomaly.predict ckpt_path=PATH input=PATH output=DIR [batch_size=16] [device=cpu]

`input` is an image file, a folder (searched recursively) or a glob pattern. Each image is read
as training reads it (any size; RGB, grayscale, RGBA, palette, 16-bit), resized to the model's
image size and scored by the checkpoint's `AnomalyDetector`; the map is resized back to the
image's own size for its overlay. Writes into `output`: `predictions.csv` (path, score,
normalized_score, verdict), `predictions.json` (the same rows and the threshold) and
`heatmaps/<name>.png`. A file that cannot be read is reported on one line and skipped; the exit
status is then 1.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from anomaly.callbacks import verdict_name
from anomaly.data.images import IMAGE_SUFFIXES, read_rgb, resize_rgb
from anomaly.detector import AnomalyDetector
from anomaly.errors import AnomalyError, ConfigError, DatasetError, NonFiniteError
from anomaly.files import atomic_path, write_text
from anomaly.models.blocks import as_pair
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
    values: dict[str, str] = {}
    for argument in arguments:
        key, equals, value = argument.partition("=")
        if not equals or key not in Settings.__dataclass_fields__:
            known = ", ".join(Settings.__dataclass_fields__)
            raise ConfigError(f"unknown argument {argument!r} (keys: {known}); {USAGE}")
        values[key] = value
    missing = [key for key in ("ckpt_path", "input", "output") if key not in values]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}; {USAGE}")
    if not values.get("batch_size", "16").isdigit() or int(values.get("batch_size", "16")) < 1:
        raise ConfigError(f"batch_size={values['batch_size']!r} is out of range: an int >= 1")
    if values.get("device", "cpu") not in ("cpu", "cuda"):
        raise ConfigError(f"device={values['device']!r} is out of range: cpu or cuda")
    if values.get("device") == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available")
    heatmaps = values.get("heatmaps", "true").lower()
    if heatmaps not in ("true", "false"):
        raise ConfigError(f"heatmaps={values['heatmaps']!r} is out of range: true or false")
    return Settings(
        ckpt_path=values["ckpt_path"],
        input=values["input"],
        output=values["output"],
        batch_size=int(values.get("batch_size", 16)),
        device=values.get("device", "cpu"),
        heatmaps=heatmaps == "true",
    )


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


def score_images(
    detector: AnomalyDetector, images: list[np.ndarray], size: tuple[int, int], device: str
) -> tuple[np.ndarray, np.ndarray]:
    """Maps (B, H, W) at the model's size and scores (B,) of uint8 RGB images of any size."""
    batch = np.stack([resize_rgb(image, size) for image in images]).astype(np.float32) / 255.0
    tensor = torch.from_numpy(batch).permute(0, 3, 1, 2).to(device)
    if next(detector.net.parameters()).is_contiguous(memory_format=torch.channels_last):
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        maps, scores, _ = detector(tensor)
    return maps.float().cpu().numpy(), scores.cpu()


def predict(settings: Settings) -> int:
    """Scores every input image and writes the outputs; returns the number of unreadable files."""
    detector, config = load_detector(settings.ckpt_path)
    if config["model"].get("channels_last", False):
        detector.net.to(memory_format=torch.channels_last)  # as training and eval ran it
    detector.to(settings.device)
    size = as_pair(config["data"]["image_size"])
    files = input_files(settings.input)
    output = Path(settings.output)
    output.mkdir(parents=True, exist_ok=True)
    if not detector.has_threshold:
        print("warning: this checkpoint has no calibrated threshold; verdicts are 'uncalibrated'")

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
        if not images:
            continue
        maps, scores = score_images(detector, images, size, settings.device)
        if not np.isfinite(maps).all() or not torch.isfinite(scores).all():
            bad = batch_files[
                int(
                    np.flatnonzero(~np.isfinite(maps).all((1, 2)) | ~np.isfinite(scores.numpy()))[0]
                )
            ]
            raise NonFiniteError(f"{bad}: non-finite anomaly map or score")
        normalized = detector.normalized_score(scores.to(detector.threshold.device)).cpu()
        verdicts = detector.verdict(scores.to(detector.threshold.device)).cpu()
        for i, path in enumerate(batch_files):
            row = {
                "path": str(path),
                "score": float(scores[i]),
                "normalized_score": float(normalized[i]),
                "verdict": verdict_name(bool(verdicts[i]), float(normalized[i])),
            }
            rows.append(row)
            if settings.heatmaps:
                shown.append((path, images[i], maps[i], row))
    progress.close()

    if shown:
        # One colour scale for the whole run, so heatmaps of different images compare.
        vmax = colour_scale([anomaly_map for _, _, anomaly_map, _ in shown])
        (output / "heatmaps").mkdir(exist_ok=True)
        for path, image, anomaly_map, row in shown:
            full = cv2.resize(anomaly_map, image.shape[1::-1], interpolation=cv2.INTER_LINEAR)
            title = f"{path.name}: score {row['score']:.4g}, {row['verdict']}"
            if detector.has_threshold:
                title += f" (normalized {row['normalized_score']:.2f})"
            save_prediction_overlay(image, full, vmax, title, output / "heatmaps" / names[path])
    with atomic_path(output / "predictions.csv") as temporary, open(temporary, "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    summary = {
        "checkpoint": str(settings.ckpt_path),
        "image_size": list(size),
        "threshold": float(detector.threshold) if detector.has_threshold else None,
        "normal_median": float(detector.normal_median) if detector.has_threshold else None,
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
    except AnomalyError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
