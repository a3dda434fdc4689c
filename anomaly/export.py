"""Export a trained checkpoint as one ONNX graph that runs without this training stack.

    python -m anomaly.export ckpt_path=PATH output=FILE.onnx [format=onnx]

The graph is the checkpoint's `ImagePipeline`, the module `python -m anomaly.predict` runs:
resizing, scaling, network, anomaly map, smoothing, standardization, score, normalized score
and verdict all inside it.

- input `images`: uint8 (B, H, W, 3), RGB, 0-255, channels last as decoders give them; any
  batch size and any H and W (one size per batch), resized inside to the model's image size.
- outputs: `anomaly_map` float32 (B, h, w) at the model's image size, `score` float32 (B,),
  `normalized_score` float64 (B,) in [0, 1] (0.5 at the threshold; nan when uncalibrated) and
  `anomalous` bool (B,).
- metadata (`metadata_props`): `image_size` ("h,w"), `threshold` and `normal_median` (raw
  scores; "nan" when uncalibrated), `model`, `checkpoint`, and the input and outputs in words.

Before the file is written, onnxruntime runs the graph on a check batch: its maps must agree
with PyTorch's within `PARITY_TOLERANCE` and its scores within `score_tolerance`; the file is
written atomically.
Needs the `export` extra: `pip install -e ".[export]"`.
"""

from __future__ import annotations

import importlib
import logging
import math
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from anomaly.command_line import key_values, one_of
from anomaly.detector import AnomalyDetector
from anomaly.errors import AnomalyError, ConfigError
from anomaly.files import atomic_path
from anomaly.models.blocks import as_pair
from anomaly.pipeline import ImagePipeline
from anomaly.runtime import user_error_message
from anomaly.tasks import load_detector

USAGE = "usage: python -m anomaly.export ckpt_path=PATH output=FILE.onnx [format=onnx]"
FORMATS = ("onnx",)
INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "score", "normalized_score", "anomalous")
# The largest difference between onnxruntime's and PyTorch's maps (in map units) an export
# accepts. Different float32 kernels round differently, by about 1e-5 on trained models' maps.
PARITY_TOLERANCE = 1e-4
INPUT_DOC = "images: uint8 (batch, height, width, 3), RGB, 0-255; any batch size and image size"
OUTPUTS_DOC = (
    "anomaly_map: float32 (batch, h, w) at image_size; score: float32 (batch,); "
    "normalized_score: float64 (batch,) in [0, 1], 0.5 at the threshold; anomalous: bool (batch,)"
)


def require(module: str):
    """Import an optional dependency of the `export` extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"{module} is not installed; it comes with the export extra: pip install -e '.[export]'"
        ) from None


def metadata(pipeline: ImagePipeline, model_name: str, checkpoint: str) -> dict[str, str]:
    """The facts a user of the exported graph needs, as ONNX metadata strings."""
    detector = pipeline.detector
    return {
        "image_size": ",".join(str(side) for side in pipeline.image_size),
        "threshold": repr(float(detector.threshold)),
        "normal_median": repr(float(detector.normal_median)),
        "model": model_name,
        "checkpoint": Path(checkpoint).name,
        "input": INPUT_DOC,
        "outputs": OUTPUTS_DOC,
    }


def check_batch(image_size: tuple[int, int]) -> torch.Tensor:
    """uint8 images (2, 3h/2, 5w/4, 3): larger than the model's size by other than whole factors,
    so the resize is exercised, yet exactly (`area_resize`) for sides divisible by 4."""
    generator = torch.Generator().manual_seed(0)
    shape = (2, 3 * image_size[0] // 2, 5 * image_size[1] // 4, 3)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)


def score_tolerance(detector: AnomalyDetector) -> float:
    """How far the scores of two runtimes may lie apart when their maps lie PARITY_TOLERANCE
    apart: a standardized score divides the map by the normal spread, so by its smallest value."""
    if detector.scores_standardized:
        return PARITY_TOLERANCE / float(detector.normal_std.min())
    return PARITY_TOLERANCE


def differences(session, pipeline: ImagePipeline, images: torch.Tensor) -> tuple[float, float]:
    """The largest differences of onnxruntime's maps and scores from PyTorch's on `images`."""
    with torch.inference_mode():
        maps, scores = (output.double().numpy() for output in pipeline(images)[:2])
    onnx_maps, onnx_scores = session.run(list(OUTPUT_NAMES[:2]), {INPUT_NAME: images.numpy()})
    return float(np.abs(onnx_maps - maps).max()), float(np.abs(onnx_scores - scores).max())


@contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Only errors from the logger `name` (and its children) within the block."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_onnx(
    pipeline: ImagePipeline, path: Path, properties: dict[str, str]
) -> tuple[float, float]:
    """Write the pipeline as an ONNX graph with a dynamic batch and image size.

    Returns:
        The check batch's largest map and score differences from PyTorch.

    Raises:
        AnomalyError: The exported graph disagrees with PyTorch; nothing is written.
    """
    onnx, onnxruntime = require("onnx"), require("onnxruntime")
    require("onnxscript")  # torch's ONNX exporter builds the graph with it
    pipeline = pipeline.eval()
    images = check_batch(pipeline.image_size)
    dims = {0: "batch", 1: "height", 2: "width"}
    shapes = {INPUT_NAME: {axis: torch.export.Dim(name) for axis, name in dims.items()}}
    with atomic_path(path) as temporary:
        # The exporter's notes (ops of packages not installed, its own deprecations) are not
        # the user's business; the command prints its own summary.
        with warnings.catch_warnings(), _quiet_logger("torch.onnx"):
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(
                    pipeline,
                    (images,),
                    str(temporary),
                    input_names=[INPUT_NAME],
                    output_names=list(OUTPUT_NAMES),
                    dynamic_shapes=shapes,
                    dynamo=True,
                    external_data=False,
                    verbose=False,
                )
            except OSError:
                raise
            except Exception as error:  # the exporter raises many types, all meaning "cannot"
                reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
                raise AnomalyError(
                    f"{path}: torch.onnx.export cannot export this model "
                    f"({type(error).__name__}: {reason}); not written"
                ) from None
        model = onnx.load(str(temporary))
        onnx.helper.set_model_props(model, properties)
        model.doc_string = f"{INPUT_DOC}. {OUTPUTS_DOC}."
        onnx.save(model, str(temporary))
        session = onnxruntime.InferenceSession(str(temporary), providers=["CPUExecutionProvider"])
        map_difference, score_difference = differences(session, pipeline, images)
        allowed = score_tolerance(pipeline.detector)
        if not (map_difference <= PARITY_TOLERANCE and score_difference <= allowed):
            raise AnomalyError(
                f"{path}: the exported graph's maps differ from PyTorch's by {map_difference:.3g} "
                f"(at most {PARITY_TOLERANCE} allowed), its scores by {score_difference:.3g} "
                f"(at most {allowed:.3g}); not written"
            )
    return map_difference, score_difference


def main(arguments: list[str] | None = None) -> int:
    """The command; returns the exit status (1 when an argument or the export failed)."""
    try:
        values = key_values(
            sys.argv[1:] if arguments is None else arguments,
            known=("ckpt_path", "output", "format"),
            required=("ckpt_path", "output"),
            usage=USAGE,
        )
        one_of(values, "format", FORMATS, "onnx")
        output = Path(values["output"])
        if not output.parent.is_dir():
            raise ConfigError(f"output={output}: folder {output.parent} does not exist")
        detector, config = load_detector(values["ckpt_path"])
        pipeline = ImagePipeline(detector, as_pair(config["data"]["image_size"]))
        properties = metadata(pipeline, config["model"]["name"], values["ckpt_path"])
        map_difference, score_difference = export_onnx(pipeline, output, properties)
    except Exception as error:  # the user's errors in one line (files, settings, memory)
        message = user_error_message(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    threshold = float(detector.threshold)
    calibrated = f"threshold {threshold:.6g}" if math.isfinite(threshold) else "no threshold"
    print(
        f"wrote {output}: {config['model']['name']} at {pipeline.image_size[0]}x"
        f"{pipeline.image_size[1]} px, {calibrated}; onnxruntime matches PyTorch within "
        f"{map_difference:.2g} on maps, {score_difference:.2g} on scores"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
