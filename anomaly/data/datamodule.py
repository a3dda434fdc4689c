"""The one LightningDataModule every model trains and tests with.

Splits:
    train: normal train images minus a held-out fraction, corrupted on the fly when configured.
    val:   the held-out normal images plus a fixed, seeded set of corrupted copies with masks, so
           validation metrics exist without touching the test split.
    test:  the test split.

Samplers are the module's own (the trainer runs with `use_distributed_sampler=False`): training
shards an epoch-seeded permutation across ranks, evaluation shards without padding, so no image is
counted twice by the distributed metrics.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from anomaly.data.corruptions import TextureSource, corrupt
from anomaly.data.mvtec import DatasetError, MVTecDataset, check_category, list_samples, make_sample
from anomaly.data.synthetic import ensure_generated

VAL_STREAM = 1_000_003  # seeds the fixed validation corruptions apart from any training epoch


class EpochSampler(Sampler[int]):
    """Shuffles `num_samples` indices with a permutation seeded by (seed, epoch), sharded by rank.

    Yields `epoch * num_samples + index`, so the dataset can seed its per-sample randomness by
    (seed, epoch, index) whatever the number of workers. Shards are padded to equal length (DDP
    training steps must match across ranks).
    """

    def __init__(
        self, num_samples: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1
    ) -> None:
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.world_size)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        order = np.resize(order, len(self) * self.world_size)  # pad by wrapping around
        offset = self.epoch * self.num_samples
        return iter((offset + order[self.rank :: self.world_size]).tolist())


class ShardSampler(Sampler[int]):
    """Every `world_size`-th index from `rank`, in order, without padding (for evaluation)."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, num_samples, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


def build_augmentation(shift: float, rotate: float, brightness: float) -> A.Compose | None:
    """Light, label-preserving augmentation of normal images; None when every amount is zero."""
    transforms = []
    if shift > 0 or rotate > 0:
        transforms.append(
            A.Affine(
                translate_percent=(-shift, shift),
                rotate=(-rotate, rotate),
                border_mode=cv2.BORDER_REFLECT_101,
                p=1.0,
            )
        )
    if brightness > 0:
        transforms.append(
            A.RandomBrightnessContrast(
                brightness_limit=brightness, contrast_limit=brightness, p=1.0
            )
        )
    return A.Compose(transforms) if transforms else None


class TrainDataset(Dataset):
    """Normal training images, augmented and corrupted with randomness seeded per sample.

    Indexed by `epoch * len(images) + index` (see EpochSampler). A sample holds `input` (what the
    network sees, corrupted or clean), `image` (the clean target) and `mask` (corrupted pixels).
    """

    def __init__(
        self,
        images: MVTecDataset,
        seed: int,
        textures: TextureSource | None,
        corruption_prob: float,
        texture_prob: float,
        elastic_prob: float,
        augmentation: A.Compose | None,
    ) -> None:
        self.images, self.seed, self.textures = images, seed, textures
        self.corruption_prob, self.texture_prob = corruption_prob, texture_prob
        self.elastic_prob, self.augmentation = elastic_prob, augmentation

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, encoded_index: int) -> dict:
        epoch, index = divmod(encoded_index, len(self.images))
        rng = np.random.default_rng([self.seed, epoch, index])
        image, _ = self.images.arrays(index)
        if self.augmentation is not None:
            self.augmentation.set_random_seed(int(rng.integers(2**31)))
            image = self.augmentation(image=image)["image"]
        clean = image.astype(np.float32) / 255.0
        corrupted, mask = clean, np.zeros(clean.shape[:2], dtype=np.float32)
        if rng.random() < self.corruption_prob:
            corrupted, mask = corrupt(
                clean, rng, self.textures, self.texture_prob, self.elastic_prob
            )
        record = self.images.records[index]
        sample = make_sample(clean, mask, 0, record.defect_type, str(record.path))
        sample["input"] = make_sample(corrupted, mask, 0, "", "")["image"]
        return sample


class ValidationDataset(Dataset):
    """Held-out normal images followed by one fixed, seeded corrupted copy of each."""

    def __init__(self, images: MVTecDataset, seed: int, textures: TextureSource | None) -> None:
        self.images = images
        self.corrupted = []
        for index in range(len(images)):
            clean = images.arrays(index)[0].astype(np.float32) / 255.0
            rng = np.random.default_rng([seed, VAL_STREAM, index])
            self.corrupted.append(corrupt(clean, rng, textures, 0.5, 0.5))

    def __len__(self) -> int:
        return 2 * len(self.images)

    def __getitem__(self, index: int) -> dict:
        if index < len(self.images):
            return self.images[index]
        index -= len(self.images)
        image, mask = self.corrupted[index]
        path = str(self.images.records[index].path)
        return make_sample(image, mask, 1, "synthetic", f"{path}#corrupted")


class AnomalyDataModule(LightningDataModule):
    """Train/val/test data of one MVTec-layout category (real or the built-in synthetic set).

    Args:
        root: folder holding `<category>/train`, `<category>/test`, `<category>/ground_truth`.
        category: category name, e.g. "capsule".
        image_size: side length (or [H, W]) images are resized to.
        batch_size: training batch size; evaluation uses `eval_batch_size` (default the same).
        num_workers, persistent_workers, pin_memory: DataLoader settings.
        seed: seeds the held-out split, the validation corruptions and per-sample randomness.
        val_fraction: fraction of the normal train images held out for validation.
        dtd_root: DTD-layout texture folder for the corruptions; None for procedural textures.
        corruption: `prob` (chance a training sample is corrupted; 0 trains a plain autoencoder),
            `texture_prob`, `elastic_prob` (see `anomaly.data.corruptions.corrupt`).
        augment: light augmentation of training images: `shift` (fraction of the size),
            `rotate` (degrees), `brightness` (brightness/contrast limit); zeros switch it off.
        synthetic: when set (a dict with `seed` and `size`), the built-in synthetic capsule set is
            generated into `root` first.
    """

    def __init__(
        self,
        root: str,
        category: str = "capsule",
        image_size: int | list[int] = 128,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        persistent_workers: bool = False,
        pin_memory: bool = False,
        seed: int = 0,
        val_fraction: float = 0.1,
        dtd_root: str | None = None,
        corruption: dict | None = None,
        augment: dict | None = None,
        synthetic: dict | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.root, self.category, self.image_size = root, category, image_size
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.seed, self.val_fraction, self.dtd_root = seed, val_fraction, dtd_root
        self.corruption = {
            "prob": 0.0,
            "texture_prob": 0.5,
            "elastic_prob": 0.5,
            **(corruption or {}),
        }
        self.augment = {"shift": 0.0, "rotate": 0.0, "brightness": 0.0, **(augment or {})}
        self.synthetic = synthetic
        self.train_set = self.val_set = self.test_set = None

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            ensure_generated(
                Path(self.root),
                self.category,
                seed=int(self.synthetic.get("seed", 0)),
                size=int(self.synthetic.get("size", 128)),
            )

    def check(self) -> None:
        """Raise DatasetError (one line, naming the file) when the dataset has a problem."""
        problems = check_category(self.root, self.category)["problems"]
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise DatasetError(
                f"{problems[0]}{more}; run `python -m anomaly.data "
                f"root={self.root} category={self.category}` for the full list"
            )

    @property
    def test_defect_types(self) -> list[str]:
        """Defect types of the test split, "good" first, as used for per-defect metrics."""
        types = {r.defect_type for r in list_samples(self.root, self.category, "test")}
        return ["good", *sorted(types - {"good"})]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None or self.test_set is not None:
            return
        self.check()
        textures = TextureSource(self.dtd_root)
        normals = list_samples(self.root, self.category, "train")
        order = np.random.default_rng([self.seed]).permutation(len(normals))
        num_val = max(1, round(self.val_fraction * len(normals)))
        if num_val >= len(normals):
            raise DatasetError(
                f"{self.root}/{self.category}/train: {len(normals)} normal images are too few to "
                f"hold out {num_val} for validation"
            )
        val_records = [normals[i] for i in sorted(order[:num_val])]
        train_records = [normals[i] for i in sorted(order[num_val:])]
        self.train_set = TrainDataset(
            MVTecDataset(train_records, self.image_size),
            self.seed,
            textures,
            float(self.corruption["prob"]),
            float(self.corruption["texture_prob"]),
            float(self.corruption["elastic_prob"]),
            build_augmentation(**self.augment),
        )
        self.val_set = ValidationDataset(
            MVTecDataset(val_records, self.image_size), self.seed, textures
        )
        self.test_set = MVTecDataset(
            list_samples(self.root, self.category, "test"), self.image_size
        )

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _loader(self, dataset: Dataset, sampler: Sampler, batch_size: int, drop_last: bool):
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers,
            pin_memory=self.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        sampler = EpochSampler(len(self.train_set), self.seed, True, rank, world)
        # Full batches only: a last batch of one or two images upsets batch normalization.
        drop_last = len(sampler) >= 2 * self.batch_size
        return self._loader(self.train_set, sampler, self.batch_size, drop_last)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        sampler = ShardSampler(len(self.val_set), rank, world)
        return self._loader(self.val_set, sampler, self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        sampler = ShardSampler(len(self.test_set), rank, world)
        return self._loader(self.test_set, sampler, self.eval_batch_size, False)

    predict_dataloader = test_dataloader
