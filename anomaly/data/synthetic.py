"""Built-in synthetic "capsule" dataset in the MVTec AD folder layout.

Every image is drawn procedurally from a seed (`anomaly.data.capsule`), so the project runs on a
fresh machine without a download. The layout and the per-split counts copy the "capsule" category
of MVTec AD (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021), so the normal
MVTec loader reads the result unchanged.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from anomaly.data.capsule import DEFECT_TYPES, check_size, render_sample
from anomaly.errors import ConfigError, DatasetError

# Image counts of MVTec AD capsule, keyed by (split, class folder).
SPLIT_COUNTS: dict[tuple[str, str], int] = {
    ("train", "good"): 219,
    ("test", "good"): 23,
    ("test", "crack"): 23,
    ("test", "faulty_imprint"): 22,
    ("test", "poke"): 21,
    ("test", "scratch"): 23,
    ("test", "squeeze"): 20,
}

FORMAT_VERSION = 1
MARKER_NAME = ".synthetic.json"


def _check_args(category: str, seed: int, size: int) -> None:
    check_size(size)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if not category or category in (".", "..") or "/" in category or "\\" in category:
        raise ConfigError(f"category must be a plain folder name, got {category!r}")


def _marker(seed: int, size: int) -> dict:
    counts = {f"{split}/{name}": n for (split, name), n in SPLIT_COUNTS.items()}
    return {"format": FORMAT_VERSION, "seed": int(seed), "size": int(size), "counts": counts}


def generate(root: Path, category: str = "capsule", seed: int = 0, size: int = 128) -> Path:
    """Write the whole synthetic dataset in the MVTec AD layout under `root/category`.

    Image k of class folder `name` in `split` is seeded from (seed, split, class, k), so the same
    arguments always give byte-identical files.

    Args:
        root: Folder that receives the category folder; created if missing.
        category: Name of the category folder.
        seed: Non-negative dataset seed.
        size: Height and width of every image in pixels (>= 16).

    Returns:
        The category folder `root/category`.
    """
    _check_args(category, seed, size)
    target = Path(root) / category
    if target.exists():
        raise ValueError(f"{target} already exists; use ensure_generated to replace a stale set")
    splits = ("train", "test")
    classes = ("good", *DEFECT_TYPES)
    for (split, name), count in SPLIT_COUNTS.items():
        folder = target / split / name
        folder.mkdir(parents=True)
        defect = None if name == "good" else name
        if defect is not None:
            (target / "ground_truth" / name).mkdir(parents=True)
        for k in range(count):
            rng = np.random.default_rng([seed, splits.index(split), classes.index(name), k])
            image, mask = render_sample(rng, size, defect)
            Image.fromarray(image).save(folder / f"{k:03d}.png", compress_level=1)
            if defect is not None:
                mask_image = Image.fromarray(mask.astype(np.uint8) * 255)
                mask_image.save(
                    target / "ground_truth" / name / f"{k:03d}_mask.png", compress_level=1
                )
    (target / MARKER_NAME).write_text(json.dumps(_marker(seed, size), sort_keys=True))
    return target


def ensure_generated(root: Path, category: str = "capsule", seed: int = 0, size: int = 128) -> Path:
    """Return `root/category`, generating it first unless it already holds this exact set.

    The set is written into a temporary sibling folder and renamed into place, so an interrupted
    run never leaves a half-written folder that looks complete. A stale synthetic set (other seed,
    size or format) is replaced; a folder without the synthetic marker is never touched.

    Args:
        root: Folder that holds the category folder; created if missing.
        category: Name of the category folder.
        seed: Non-negative dataset seed.
        size: Height and width of every image in pixels (>= 16).

    Returns:
        The category folder `root/category`.
    """
    _check_args(category, seed, size)
    root = Path(root)
    target = root / category
    wanted = _marker(seed, size)
    marker = target / MARKER_NAME
    if target.exists():
        if not marker.is_file():
            raise DatasetError(
                f"{target}: exists but is not a synthetic set; refusing to replace it"
            )
        try:
            if json.loads(marker.read_text()) == wanted:
                return target
        except json.JSONDecodeError:
            pass  # a damaged marker marks a stale set of ours: regenerate it
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{category}.tmp-"))
    try:
        generate(staging, category, seed, size)
        if target.exists():
            # A directory cannot be renamed onto a non-empty one: move the stale set aside first.
            stale = Path(tempfile.mkdtemp(dir=root, prefix=f".{category}.stale-"))
            os.replace(target, stale / category)
        os.replace(staging / category, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for leftover in root.glob(f".{category}.stale-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    return target
