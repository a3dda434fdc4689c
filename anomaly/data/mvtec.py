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
from PIL import Image
from torch.utils.data import Dataset

from anomaly.data.images import (
    image_files,
    load_image,
    load_mask,
    mask_levels,
    mask_problem,
    open_image,
    rgb_pixels,
)
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

    Every image and mask is decoded and converted as training will read it.

    Returns:
        A JSON-ready dict: counts per split and defect type, number of masks, image sizes and modes
        (PIL modes, e.g. "RGB", "L", "I;16"), and `problems`, one line per file with a problem
        (empty when the dataset is usable).
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
                rgb_pixels(image, record.path)
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
            problem = check_mask(mask, record.mask_path, image.size)
            if problem is not None:
                problems.append(problem)
        if split == "test":
            problems.extend(unmatched_masks(Path(root) / category, records))
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


def check_mask(mask: Image.Image, path: Path, image_size: tuple[int, int]) -> str | None:
    """What is wrong with a decoded mask, as one line naming its file, or None.

    Args:
        mask: The decoded mask.
        path: Its file.
        image_size: Its image's (width, height), which the mask must match.
    """
    if mask.size != image_size:
        width, height = image_size
        return f"{path}: mask is {mask.width}x{mask.height} but its image is {width}x{height}"
    problem = mask_problem(mask_levels(mask))
    return None if problem is None else f"{path}: {problem}"


def unmatched_masks(category_folder: Path, test_records: list[SampleRecord]) -> list[str]:
    """Masks in `ground_truth/` that belong to no test image, one line each.

    A mask `ground_truth/<defect>/<id>_mask.png` belongs to the image `test/<defect>/<id>.<suffix>`;
    a defect folder of `ground_truth/` needs a folder of the same name in `test/`. Masks of good
    images are not read, so `ground_truth/good` is not checked.
    """
    truth = category_folder / "ground_truth"
    if not truth.is_dir():
        return []
    expected = {r.mask_path for r in test_records if r.mask_path is not None}
    problems = []
    for folder in sorted(p for p in truth.iterdir() if p.is_dir() and p.name != GOOD):
        test_folder = category_folder / "test" / folder.name
        if not test_folder.is_dir():
            problems.append(
                f"{folder}: ground-truth folder without a test folder; expected {test_folder}"
            )
            continue
        for mask in image_files(folder):
            if mask in expected:
                continue
            named = mask.name.endswith("_mask.png")
            image_id = mask.name.removesuffix("_mask.png") if named else "<id>"
            problems.append(
                f"{mask}: mask without image; expected {test_folder / image_id}.<suffix> "
                "(masks are named <id>_mask.png after their image <id>.<suffix>)"
            )
    return problems


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
