"""The training and validation datasets built from the normal training images.

train: normal images, lightly augmented and, for the restoration objective, corrupted on the fly
       with randomness seeded per (seed, epoch, sample).
val:   the held-out normal images plus fixed, seeded, subtle corrupted copies of each, with
       masks, so validation metrics exist without touching the test split.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from anomaly.data.corruptions import add_kept_noise, corrupt
from anomaly.data.foreground import foreground_mask
from anomaly.data.mvtec import MVTecDataset, make_sample
from anomaly.data.textures import TextureSource

VAL_STREAM = 1_000_003  # seeds the fixed validation corruptions apart from any training epoch


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
    network sees, corrupted or clean), `image` (the clean target), `mask` (corrupted pixels) and
    `draw` (the index, which seeds corruptions applied later to the whole batch). A corruption
    is centred on the object (`foreground_mask` of the augmented image) with chance
    `on_object_prob`, anywhere otherwise; with `with_foreground` the sample also holds that
    mask as `foreground` (1, H, W), for corruptions applied later to the batch. With
    `noise_std` > 0, input and target carry the same Gaussian noise (`add_kept_noise`); with
    `scratch_prob` > 0, that share of the corruptions are scratches (`corrupt`).
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
        on_object_prob: float = 0.0,
        with_foreground: bool = False,
        noise_std: float = 0.0,
        scratch_prob: float = 0.0,
    ) -> None:
        self.images, self.seed, self.textures = images, seed, textures
        self.noise_std, self.scratch_prob = noise_std, scratch_prob
        self.corruption_prob, self.texture_prob = corruption_prob, texture_prob
        self.elastic_prob, self.augmentation = elastic_prob, augmentation
        self.on_object_prob, self.with_foreground = on_object_prob, with_foreground

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
            # Drawn only when it can come up, so runs without it keep their random streams.
            on_object = self.on_object_prob > 0 and rng.random() < self.on_object_prob
            where = foreground_mask(clean) if on_object else None
            corrupted, mask = corrupt(
                clean,
                rng,
                self.textures,
                self.texture_prob,
                self.elastic_prob,
                where=where,
                scratch_prob=self.scratch_prob,
            )
        foreground = foreground_mask(clean) if self.with_foreground else None
        if self.noise_std > 0:
            clean, corrupted = add_kept_noise(rng, clean, corrupted, self.noise_std)
        record = self.images.records[index]
        sample = make_sample(clean, mask, 0, record.defect_type, str(record.path))
        sample["input"] = make_sample(corrupted, mask, 0, "", "")["image"]
        if foreground is not None:
            sample["foreground"] = torch.from_numpy(foreground)[None]
        sample["draw"] = encoded_index  # seeds the batch's corruptions on the device
        return sample


class ValidationDataset(Dataset):
    """Held-out normal images followed by `copies` fixed, seeded corrupted copies of each.

    The copies are subtle corruptions (`corrupt(subtle=True)`), hard enough that validation tells
    scores and checkpoints apart. Several per normal: a category holds out only a few dozen
    normal images, and one anomaly each makes validation's image AUROC a noisy estimate. With
    `on_object`, each corruption is centred on the object (`foreground_mask` of its normal
    image), where the real defects of an object category lie; on textures that is anywhere.
    """

    def __init__(
        self,
        images: MVTecDataset,
        seed: int,
        textures: TextureSource | None,
        copies: int = 1,
        on_object: bool = True,
    ) -> None:
        self.images, self.copies = images, copies
        self.corrupted = []
        for index in range(len(images)):
            clean = images.arrays(index)[0].astype(np.float32) / 255.0
            where = foreground_mask(clean) if on_object else None
            for copy in range(copies):
                rng = np.random.default_rng([seed, VAL_STREAM, index, copy])
                self.corrupted.append(
                    corrupt(clean, rng, textures, 0.5, 0.5, subtle=True, where=where)
                )

    def __len__(self) -> int:
        return (1 + self.copies) * len(self.images)

    def __getitem__(self, index: int) -> dict:
        if index < len(self.images):
            return self.images[index]
        index -= len(self.images)
        image, mask = self.corrupted[index]
        normal, copy = divmod(index, self.copies)
        path = str(self.images.records[normal].path)
        return make_sample(image, mask, 1, "synthetic", f"{path}#corrupted{copy}")
