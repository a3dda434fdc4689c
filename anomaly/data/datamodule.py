"""The one LightningDataModule every model trains and tests with.

Splits: train (normal train images minus a held-out fraction, corrupted on the fly when the
model's objective says so), val (the held-out normals plus fixed corrupted copies with masks; see
`anomaly.data.splits`) and test (the test split). Samplers shard by rank (`anomaly.data.samplers`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from anomaly.data.batch_corruptions import BatchCorruption, texture_bank
from anomaly.data.mvtec import MVTecDataset, check_category, list_samples
from anomaly.data.samplers import EpochSampler, ShardSampler
from anomaly.data.splits import TrainDataset, ValidationDataset, build_augmentation
from anomaly.data.synthetic import ensure_generated
from anomaly.data.textures import TextureSource, check_textures
from anomaly.errors import ConfigError, DatasetError
from anomaly.models.blocks import as_pair

log = logging.getLogger(__name__)


# Held-out normal images at least: the per-pixel spread of their maps must be estimable.
MIN_HELD_OUT = 3
# Where training images are corrupted: one at a time in the loader workers, or as whole batches
# on the device the model trains on (`corrupt_on_device`, called by the module's batch hook).
CORRUPTION_DEVICES = ("loader", "model")


def held_out_count(num_normals: int, val_fraction: float) -> int:
    """How many normal training images validation holds out: the fraction, at least
    `MIN_HELD_OUT`."""
    wanted = round(val_fraction * num_normals)
    if wanted < MIN_HELD_OUT:
        log.warning(
            "holding out %d of %d normal images for validation (data.val_fraction=%s gives %d)",
            MIN_HELD_OUT,
            num_normals,
            val_fraction,
            wanted,
        )
    return max(MIN_HELD_OUT, wanted)


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
        val_corrupted_copies: synthetic anomalies per held-out normal image (fixed, seeded
            corrupted copies): validation's image AUROC and the choices made on it (checkpoint,
            standardized score, threshold) rest on this many times the held-out normals.
        val_anomalies_on_object: centre those synthetic anomalies on the object (told from the
            image border's colour; anywhere on textures), where real defects lie.
        dtd_root: DTD-layout texture folder for the corruptions; None for procedural textures.
        corruption: the model objective's corruption of training images (`model.objective`):
            `prob` (chance a training sample is corrupted; 0 trains a plain autoencoder),
            `texture_prob`, `elastic_prob` (see `anomaly.data.corruptions.corrupt`),
            `on_object_prob` (chance a corruption is centred on the object, as the validation
            anomalies are; anywhere otherwise), `noise_std` (Gaussian noise on every training
            input, kept in its target: `anomaly.data.corruptions.add_kept_noise`),
            `scratch_prob` (share of the corruptions that are thin scratches), and `device`:
            "loader" corrupts each sample in the loader workers, "model" whole batches on the
            training device (`anomaly.data.batch_corruptions`).
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
        val_corrupted_copies: int = 4,
        val_anomalies_on_object: bool = True,
        dtd_root: str | None = None,
        corruption: dict | None = None,
        augment: dict | None = None,
        synthetic: dict | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if isinstance(val_corrupted_copies, bool) or not (
            isinstance(val_corrupted_copies, int) and val_corrupted_copies >= 1
        ):
            raise ConfigError(
                f"data.val_corrupted_copies must be at least 1, got {val_corrupted_copies}"
            )
        if not isinstance(val_anomalies_on_object, bool):
            raise ConfigError(
                "data.val_anomalies_on_object must be true or false, "
                f"got {val_anomalies_on_object!r}"
            )
        self.root, self.category, self.image_size = root, category, image_size
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.seed, self.val_fraction, self.dtd_root = seed, val_fraction, dtd_root
        self.val_corrupted_copies = val_corrupted_copies
        self.val_anomalies_on_object = val_anomalies_on_object
        corruption = {
            "prob": 0.0,
            "texture_prob": 0.5,
            "elastic_prob": 0.5,
            "on_object_prob": 0.0,
            "noise_std": 0.0,
            "scratch_prob": 0.0,
            **(corruption or {}),
        }
        self.corruption_device = corruption.pop("device", "loader")
        if self.corruption_device not in CORRUPTION_DEVICES:
            raise ConfigError(
                f"data.corruption.device must be one of {', '.join(CORRUPTION_DEVICES)}, "
                f"got {self.corruption_device!r}"
            )
        for key, value in corruption.items():
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"corruption {key} must be in [0, 1], got {value}")
        self.corruption = corruption
        self.batch_corruption: BatchCorruption | None = None
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
        """Raise DatasetError (one line, naming the file) when the data or textures have a problem.

        The textures of `dtd_root`, when set, are decoded too, so a bad file stops the run before
        training starts rather than in a worker mid-epoch.
        """
        problems = check_category(self.root, self.category)["problems"]
        command = f"python -m anomaly.data root={self.root} category={self.category}"
        if self.dtd_root is not None:
            problems += check_textures(self.dtd_root)
            command += f" dtd_root={self.dtd_root}"
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise DatasetError(f"{problems[0]}{more}; run `{command}` for the full list")

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
        num_val = held_out_count(len(normals), self.val_fraction)
        if num_val >= len(normals):
            raise DatasetError(
                f"{self.root}/{self.category}/train: {len(normals)} normal images are too few; "
                f"validation holds out at least {MIN_HELD_OUT} (the normal-map statistics need "
                "them) and training needs the rest: add normal images"
            )
        val_records = [normals[i] for i in sorted(order[:num_val])]
        train_records = [normals[i] for i in sorted(order[num_val:])]
        prob = float(self.corruption["prob"])
        texture_prob = float(self.corruption["texture_prob"])
        elastic_prob = float(self.corruption["elastic_prob"])
        on_object_prob = float(self.corruption["on_object_prob"])
        noise_std = float(self.corruption["noise_std"])
        scratch_prob = float(self.corruption["scratch_prob"])
        with_foreground = False
        if self.corruption_device == "model" and (prob > 0 or noise_std > 0):
            if scratch_prob > 0:
                raise ConfigError(
                    "model.objective.corruption.scratch_prob > 0 needs "
                    "data.corruption.device=loader: the on-device corruptions draw no scratches"
                )
            bank = texture_bank(textures, max(as_pair(self.image_size)), self.seed)
            self.batch_corruption = BatchCorruption(
                bank, self.seed, prob, texture_prob, elastic_prob, on_object_prob, noise_std
            )
            # The loader hands over clean images, with their objects' masks.
            prob, noise_std = 0.0, 0.0
            with_foreground = on_object_prob > 0
        self.train_set = TrainDataset(
            MVTecDataset(train_records, self.image_size),
            self.seed,
            textures,
            prob,
            texture_prob,
            elastic_prob,
            build_augmentation(**self.augment),
            on_object_prob,
            with_foreground,
            noise_std,
            scratch_prob,
        )
        self.val_set = ValidationDataset(
            MVTecDataset(val_records, self.image_size),
            self.seed,
            textures,
            self.val_corrupted_copies,
            self.val_anomalies_on_object,
        )
        self.test_set = MVTecDataset(
            list_samples(self.root, self.category, "test"), self.image_size
        )

    def training_levels(self) -> tuple[float, float]:
        """The mean level and the mean spread of levels of the normal training images, as
        `anomaly.detector.image_levels` measures one image (levels in [0, 1], before
        augmentation): the reference that `model.normalize_levels` maps every image to."""
        images = self.train_set.images
        means, spreads = [], []
        for index in range(len(images)):
            levels = images.arrays(index)[0].astype(np.float64) / 255.0
            means.append(levels.mean())
            spreads.append(levels.std())
        return float(np.mean(means)), float(np.mean(spreads))

    def corrupt_on_device(self, batch: dict) -> dict:
        """Corrupt a training batch where it lies (`data.corruption.device=model`); any other
        batch, or any batch under `device=loader`, comes back as it is.

        Args:
            batch: a collated batch after its transfer to the training device; training batches
                hold `image` (B, 3, H, W) and `draw` (B,), and `foreground` (B, 1, H, W) when
                corruptions fall on the object.

        Returns:
            the batch, its `input` and `mask` replaced by the corrupted images and their masks
            (and with `noise_std`, `input` and `image` carrying the same noise).
        """
        if self.batch_corruption is None or "draw" not in batch:
            return batch
        corruption = self.batch_corruption
        batch["input"], batch["mask"] = corruption(
            batch["image"], batch["draw"], batch.get("foreground")
        )
        if corruption.noise_std > 0:
            batch["image"], batch["input"] = corruption.add_kept_noise(
                batch["image"], batch["input"], batch["draw"]
            )
        return batch

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
