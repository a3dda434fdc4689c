"""MVTec AD folder layout: the sample table, the dataset check and the dataset.

Layout of one category::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect>/<id>.png
    <root>/<category>/ground_truth/<defect>/<id>_mask.png
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from anomaly.data.images import image_files, load_image, load_mask, open_image
from anomaly.errors import DatasetError
from anomaly.models.blocks import as_pair

GOOD = "good"


@dataclass(frozen=True)
class SampleRecord:
    """One row of the sample table: an image, its label and (for defects) its mask file."""

    path: Path
    label: int  # 0 normal, 1 anomalous
    defect_type: str
    mask_path: Path | None  # None for good images; may not exist (the check reports it)


def category_dir(root: str | Path, category: str) -> Path:
    """Return `<root>/<category>`, or raise DatasetError naming the categories that do exist."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: data root does not exist")
    folder = root / category
    if not folder.is_dir():
        existing = sorted(p.name for p in root.iterdir() if (p / "train").is_dir())
        raise DatasetError(
            f"{folder}: category '{category}' does not exist; categories found: {existing}"
        )
    return folder


def list_samples(root: str | Path, category: str, split: str) -> list[SampleRecord]:
    """Build the sample table of one split ("train" or "test"), sorted by defect type and file."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got '{split}'")
    split_dir = category_dir(root, category) / split
    if not split_dir.is_dir():
        raise DatasetError(f"{split_dir}: split folder is missing")
    records = []
    for defect_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        if split == "train" and defect != GOOD:
            continue  # training sees normal images only
        for path in image_files(defect_dir):
            if defect == GOOD:
                records.append(SampleRecord(path, 0, defect, None))
            else:
                mask = split_dir.parent / "ground_truth" / defect / f"{path.stem}_mask.png"
                records.append(SampleRecord(path, 1, defect, mask))
    return records


def check_category(root: str | Path, category: str) -> dict:
    """Check a category folder and describe it.

    Returns:
        A JSON-ready dict: counts per split and defect type, number of masks, image sizes and modes,
        and `problems`, one line per file with a problem (empty when the dataset is usable).
    """
    report: dict = {"root": str(root), "category": category, "problems": []}
    problems: list[str] = report["problems"]
    try:
        category_dir(root, category)
    except DatasetError as err:
        problems.append(str(err))
        return report
    sizes: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    counts: dict[str, dict[str, int]] = {}
    num_masks = 0
    for split in ("train", "test"):
        try:
            records = list_samples(root, category, split)
        except DatasetError as err:
            problems.append(str(err))
            continue
        if not records:
            problems.append(f"{Path(root) / category / split}: split holds no images")
        counts[split] = dict(Counter(r.defect_type for r in records))
        for record in records:
            try:
                image = open_image(record.path)
            except DatasetError as err:
                problems.append(str(err))
                continue
            sizes[f"{image.width}x{image.height}"] += 1
            modes[image.mode] += 1
            if record.mask_path is None:
                continue
            if not record.mask_path.is_file():
                problems.append(f"{record.path}: ground-truth mask {record.mask_path} is missing")
                continue
            try:
                mask = open_image(record.mask_path)
            except DatasetError as err:
                problems.append(str(err))
                continue
            num_masks += 1
            if mask.size != image.size:
                problems.append(
                    f"{record.mask_path}: mask is {mask.width}x{mask.height} but its image is "
                    f"{image.width}x{image.height}"
                )
            values = np.unique(np.asarray(mask.convert("L")))
            if not set(values.tolist()) <= {0, 255} and not set(values.tolist()) <= {0, 1}:
                problems.append(
                    f"{record.mask_path}: mask is not binary ({len(values)} distinct values)"
                )
    report.update(
        counts=counts,
        num_train=sum(counts.get("train", {}).values()),
        num_test=sum(counts.get("test", {}).values()),
        num_masks=num_masks,
        image_sizes=dict(sizes),
        image_modes=dict(modes),
    )
    report["problems"] = report.pop("problems")  # last, after the description
    return report


class MVTecDataset(Dataset):
    """Images (and masks) of one split, resized, decoded once and kept in memory.

    A sample is a dict: `image` float (3, H, W) in [0, 1], `mask` float (1, H, W) in {0, 1},
    `label` int (0 normal, 1 anomalous), `defect_type` str, `path` str.
    """

    def __init__(self, records: list[SampleRecord], image_size: int | tuple[int, int]) -> None:
        self.records = list(records)
        self.size = as_pair(image_size)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.records)

    def arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The resized image (H, W, 3) uint8 and mask (H, W) uint8 of one sample, cached."""
        if index not in self._cache:
            record = self.records[index]
            self._cache[index] = (
                load_image(record.path, self.size),
                load_mask(record.mask_path, self.size),
            )
        return self._cache[index]

    def __getitem__(self, index: int) -> dict:
        image, mask = self.arrays(index)
        record = self.records[index]
        return make_sample(image, mask, record.label, record.defect_type, str(record.path))


def make_sample(
    image: np.ndarray, mask: np.ndarray, label: int, defect_type: str, path: str
) -> dict:
    """Build a sample dict from an image (H, W, 3) uint8 or float in [0, 1] and a mask (H, W)."""
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    return {
        "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float(),
        "mask": torch.from_numpy(np.ascontiguousarray(mask)).float().unsqueeze(0),
        "label": int(label),
        "defect_type": defect_type,
        "path": path,
    }
