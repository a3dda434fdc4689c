"""Shared fixtures: tiny generated MVTec-layout trees (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly.data.datamodule import AnomalyDataModule

torch.set_num_threads(2)

SHARED_MVTEC = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec"
SHARED_DTD = Path(__file__).resolve().parents[2] / "shared" / "data" / "dtd"


def write_tree(
    root: Path,
    category: str = "widget",
    num_train: int = 12,
    num_good: int = 3,
    defects: dict[str, int] | None = None,
    size: tuple[int, int] = (40, 52),
    mode: str = "RGB",
    seed: int = 0,
) -> Path:
    """Write a small MVTec-layout category of random images (W, H = size) and square masks."""
    rng = np.random.default_rng(seed)
    defects = {"scratch": 2, "dent": 2} if defects is None else defects
    width, height = size
    channels = 3 if mode == "RGB" else 1

    def save_image(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)

    base = root / category
    for i in range(num_train):
        save_image(base / "train" / "good" / f"{i:03d}.png")
    for i in range(num_good):
        save_image(base / "test" / "good" / f"{i:03d}.png")
    for defect, count in defects.items():
        for i in range(count):
            save_image(base / "test" / defect / f"{i:03d}.png")
            mask = np.zeros((height, width), dtype=np.uint8)
            mask[height // 4 : height // 2, width // 4 : width // 2] = 255
            mask_path = base / "ground_truth" / defect / f"{i:03d}_mask.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask, "L").save(mask_path)
    return base


def make_datamodule(root: Path, **overrides) -> AnomalyDataModule:
    """A set-up DataModule over a `write_tree` category: 32 px, a quarter held out, corrupted."""
    settings = dict(
        root=str(root),
        category="widget",
        image_size=32,
        batch_size=4,
        seed=1,
        val_fraction=0.25,
        corruption={"prob": 1.0},
    )
    settings.update(overrides)
    datamodule = AnomalyDataModule(**settings)
    datamodule.setup("fit")
    return datamodule


@pytest.fixture
def tiny_tree(tmp_path: Path) -> Path:
    write_tree(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny training run of the built-in set: (its folder, its best checkpoint, the data)."""
    from tests.test_train import run, tiny_settings

    data_dir = tmp_path_factory.mktemp("data")
    run_dir = tmp_path_factory.mktemp("run")
    done = run("train.py", *tiny_settings(data_dir, run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    best = next((run_dir / "checkpoints").glob("epoch_*.ckpt"))
    return run_dir, best, data_dir / "synthetic" / "capsule"
