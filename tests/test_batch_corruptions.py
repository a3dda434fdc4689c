"""Tests for anomaly.data.batch_corruptions: exact masks, determinism, and the per-sample path's
statistics; the DataModule's `device=model` path end to end."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from anomaly.anomaly_map import AnomalyMap
from anomaly.data import batch_corruptions as batched
from anomaly.data import corruptions as per_sample
from anomaly.data.batch_corruptions import (
    PROCEDURAL_BANK,
    BatchCorruption,
    blob_regions,
    corrupt_batch,
    texture_bank,
)
from anomaly.data.capsule import render_pair
from anomaly.data.corruptions import AREA_RANGE, CHANGE_TOLERANCE
from anomaly.data.datamodule import AnomalyDataModule
from anomaly.data.textures import TextureSource
from anomaly.detector import AnomalyDetector
from anomaly.errors import ConfigError
from anomaly.models.sdc_ccm import SDCCCMAutoencoder
from anomaly.module import AnomalyModule
from anomaly.objective import ReconstructionLoss
from tests.conftest import make_datamodule
from tests.test_module import quiet_trainer


def capsule_images(count: int, size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [render_pair(rng, size, None)[0].astype(np.float32) / 255 for _ in range(count)]


def as_batch(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def bank() -> torch.Tensor:
    return texture_bank(TextureSource(None), 48, seed=0)


def assert_exact(images: torch.Tensor, corrupted: torch.Tensor, mask: torch.Tensor) -> None:
    """Outside the mask bit-identical; inside it, some channel changed by more than a level."""
    assert corrupted.shape == images.shape and corrupted.dtype == images.dtype
    assert mask.shape == (images.shape[0], 1, *images.shape[2:]) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert corrupted.min() >= 0 and corrupted.max() <= 1
    change = (corrupted - images).abs().amax(dim=1, keepdim=True)
    assert torch.equal(change > CHANGE_TOLERANCE, mask > 0)
    outside = (mask == 0).expand_as(images)
    assert torch.equal(corrupted[outside].view(torch.int32), images[outside].view(torch.int32))


@pytest.mark.parametrize(("texture_prob", "elastic_prob"), [(1, 0), (0, 1), (0.5, 0.5)])
@pytest.mark.parametrize(("height", "width"), [(48, 48), (40, 56)])
def test_masks_mark_exactly_the_changed_pixels(bank, texture_prob, elastic_prob, height, width):
    images = as_batch(capsule_images(12, 64))[:, :, :height, :width].contiguous()
    generator = torch.Generator().manual_seed(3)
    corrupted, mask = corrupt_batch(images, generator, bank, 1.0, texture_prob, elastic_prob)
    assert_exact(images, corrupted, mask)
    assert (mask.flatten(1).sum(dim=1) > 0).all()


def test_images_left_clean_are_untouched_and_the_rest_corrupted(bank):
    images = as_batch(capsule_images(16, 48))
    corrupted, mask = corrupt_batch(images, torch.Generator().manual_seed(0), bank, 0.5)
    assert_exact(images, corrupted, mask)
    touched = mask.flatten(1).any(dim=1)
    assert 0 < int(touched.sum()) < 16
    assert torch.equal(corrupted[~touched], images[~touched])
    untouched, empty = corrupt_batch(images, torch.Generator(), bank, 1.0, 0.0, 0.0)
    assert torch.equal(untouched, images) and not empty.any()


def test_extreme_values_stay_exact(bank):
    images = torch.zeros(6, 3, 32, 32)
    images[:3] = 1.0
    images[:, :, 8:24, 8:24] = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    corrupted, mask = corrupt_batch(images, torch.Generator().manual_seed(2), bank)
    assert_exact(images, corrupted, mask)


@pytest.mark.parametrize("images_per_part", [8, 3])
def test_a_seeded_batch_reproduces_and_other_draws_differ(bank, monkeypatch, images_per_part):
    # The CPU corrupts a batch in parts of a few images: whole or parted, the contract holds.
    monkeypatch.setattr(batched, "CPU_CHUNK_PIXELS", images_per_part * 48 * 48)
    images = as_batch(capsule_images(8, 48))
    corruption = BatchCorruption(bank, seed=5, prob=0.8, texture_prob=0.5, elastic_prob=0.5)
    draws = torch.arange(8) + 100
    first, first_mask = corruption(images, draws)
    assert_exact(images, first, first_mask)
    again, again_mask = corruption(images, draws)
    assert torch.equal(first, again) and torch.equal(first_mask, again_mask)
    other, _ = corruption(images, draws + 8)
    reseeded, _ = BatchCorruption(bank, 6, 0.8, 0.5, 0.5)(images, draws)
    assert not torch.equal(first, other) and not torch.equal(first, reseeded)


def test_regions_cover_the_drawn_share_and_stay_inside_the_image():
    generator = torch.Generator().manual_seed(0)
    regions, depth, radius = blob_regions(generator, 64, 64, 80)
    assert regions.shape == depth.shape == (64, 1, 64, 80) and radius.shape == (64,)
    areas = regions.float().mean(dim=(1, 2, 3))
    assert (regions.flatten(1).sum(dim=1) >= 1).all()
    # The threshold is a quantile of a quarter of the pixels: areas land near the drawn range.
    assert areas.min() >= 0.5 * AREA_RANGE[0] and areas.max() <= 1.2 * AREA_RANGE[1]
    assert torch.equal(regions, depth >= 0)


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance: the largest gap between the empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    points = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, points, side="right") / len(a)
    cdf_b = np.searchsorted(b, points, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def counted(monkeypatch, module, counts: dict) -> None:
    """Count the images that reach `module`'s texture and elastic steps."""
    for name in ("_texture", "_elastic"):
        original = getattr(module, name)

        def wrapped(image, *args, original=original, key=name, **kwargs):
            counts[key] += image.shape[0] if image.ndim == 4 else 1
            return original(image, *args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)


@pytest.mark.parametrize(("texture_prob", "elastic_prob"), [(0.5, 0.5), (1.0, 0.0)])
def test_the_same_statistics_as_the_per_sample_path(monkeypatch, texture_prob, elastic_prob):
    draws, size = 256, 64
    images = capsule_images(16, size)
    textures = TextureSource(None)
    sample_counts = {"_texture": 0, "_elastic": 0}
    counted(monkeypatch, per_sample, sample_counts)
    sample_areas = [
        per_sample.corrupt(
            images[i % 16], np.random.default_rng([1, i]), textures, texture_prob, elastic_prob
        )[1].mean()
        for i in range(draws)
    ]
    batch_counts = {"_texture": 0, "_elastic": 0}
    counted(monkeypatch, batched, batch_counts)
    bank = texture_bank(textures, size, seed=0)
    batch_areas = []
    for i in range(draws // 16):
        generator = torch.Generator().manual_seed(i)
        _, mask = corrupt_batch(as_batch(images), generator, bank, 1.0, texture_prob, elastic_prob)
        batch_areas += mask.mean(dim=(1, 2, 3)).tolist()

    # Given that one of two independent draws came up, each did with chance p / (1 - q'), q' the
    # chance of neither: 2/3 each for (0.5, 0.5); the texture always for (1, 0).
    neither = (1 - texture_prob) * (1 - elastic_prob)
    for counts in (sample_counts, batch_counts):
        assert counts["_texture"] / draws == pytest.approx(texture_prob / (1 - neither), abs=0.08)
        assert counts["_elastic"] / draws == pytest.approx(elastic_prob / (1 - neither), abs=0.08)
    assert ks_statistic(np.array(sample_areas), np.array(batch_areas)) < 0.2
    assert np.median(batch_areas) == pytest.approx(np.median(sample_areas), rel=0.5)


def test_region_centres_lie_in_the_foreground_asked_for():
    # Small single blobs centred in a 6 x 6 corner square stay near it; unconstrained ones do not.
    where = torch.zeros(40, 1, 64, 64, dtype=torch.bool)
    where[..., 4:10, 50:56] = True
    near = F.max_pool2d(where.float(), 31, stride=1, padding=15).bool()
    small = dict(area_range=(0.002, 0.002), max_blobs=1)
    placed, _, _ = blob_regions(torch.Generator().manual_seed(0), 40, 64, 64, **small, where=where)
    assert placed.flatten(1).any(dim=1).all() and not (placed & ~near).any()
    anywhere, _, _ = blob_regions(torch.Generator().manual_seed(0), 40, 64, 64, **small)
    assert int((anywhere & ~near).flatten(1).any(dim=1).sum()) > 20


def test_on_object_prob_sets_the_share_of_corruptions_on_the_object(bank):
    images = torch.rand(32, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    foreground = torch.zeros(32, 1, 48, 48, dtype=torch.bool)
    foreground[..., :12] = True  # a quarter of each image
    shares = []
    for on_object_prob in (0.0, 0.5, 1.0):
        generator = torch.Generator().manual_seed(1)
        corrupted, mask = corrupt_batch(
            images, generator, bank, 1.0, 0.5, 0.5, on_object_prob, foreground
        )
        assert_exact(images, corrupted, mask)
        changed = mask.bool()
        shares.append(float((changed & foreground).sum() / changed.sum()))
    # Anywhere, about the object's quarter of the changed pixels; on it, most of them.
    assert shares[0] < 0.35 < shares[1] < 0.65 < shares[2]
    with pytest.raises(ValueError, match="on_object_prob > 0 needs a .B, 1, H, W. foreground"):
        corrupt_batch(images, torch.Generator(), bank, 1.0, 0.5, 0.5, 1.0, None)


def test_texture_bank_from_dtd_files_and_procedural(tmp_path):
    rng = np.random.default_rng(0)
    for index, shape in enumerate([(40, 70, 3), (90, 30, 3)]):
        folder = tmp_path / "dtd" / "images" / f"kind{index}"
        folder.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / "a.png")
    dtd = texture_bank(TextureSource(tmp_path / "dtd"), 24, seed=0)
    assert dtd.shape == (2, 3, 24, 24) and dtd.dtype == torch.uint8
    procedural = texture_bank(TextureSource(None), 24, seed=0)
    assert procedural.shape == (PROCEDURAL_BANK, 3, 24, 24)
    assert torch.equal(procedural, texture_bank(TextureSource(None), 24, seed=0))
    assert not torch.equal(procedural, texture_bank(TextureSource(None), 24, seed=1))


def test_datamodule_corrupts_training_batches_on_the_device(tiny_tree):
    settings = dict(root=str(tiny_tree), category="widget", image_size=32, batch_size=4)
    corruption = {"prob": 1.0, "texture_prob": 0.5, "elastic_prob": 0.5}
    on_device = AnomalyDataModule(**settings, corruption={**corruption, "device": "model"})
    on_device.setup("fit")
    batch = next(iter(on_device.train_dataloader()))
    # The loader hands over clean images; the hook corrupts them.
    assert torch.equal(batch["input"], batch["image"]) and not batch["mask"].any()
    batch = on_device.corrupt_on_device(batch)
    assert_exact(batch["image"], batch["input"], batch["mask"])
    assert (batch["mask"].flatten(1).sum(dim=1) > 0).all()
    validation = next(iter(on_device.val_dataloader()))
    assert on_device.corrupt_on_device(validation) is validation

    in_loader = AnomalyDataModule(**settings, corruption=corruption)
    in_loader.setup("fit")
    batch = next(iter(in_loader.train_dataloader()))
    assert batch["mask"].flatten(1).any(dim=1).all()
    assert in_loader.corrupt_on_device(batch)["input"] is batch["input"]


def write_objects(root: Path, count: int = 40, size: int = 48) -> Path:
    """A `widget` category: a textured square object on a plain backdrop, one test defect."""
    rng = np.random.default_rng(0)
    base = root / "widget"
    paths = [base / "train" / "good" / f"{index:03d}.png" for index in range(count)]
    paths += [base / "test" / "good" / "000.png", base / "test" / "dent" / "000.png"]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.full((size, size, 3), 40, np.uint8)
        pixels[12:36, 12:36] = rng.integers(150, 255, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    mask = np.zeros((size, size), np.uint8)
    mask[16:20, 16:20] = 255
    (base / "ground_truth" / "dent").mkdir(parents=True)
    Image.fromarray(mask, "L").save(base / "ground_truth" / "dent" / "000_mask.png")
    return root


@pytest.mark.parametrize("device", ["loader", "model"])
def test_training_corruptions_fall_on_the_object_when_asked(tmp_path, device):
    root = write_objects(tmp_path)
    shares = []
    for on_object_prob in (0.0, 1.0):
        corruption = {"prob": 1.0, "on_object_prob": on_object_prob, "device": device}
        datamodule = AnomalyDataModule(
            root=str(root), category="widget", image_size=48, batch_size=6, corruption=corruption
        )
        datamodule.setup("fit")
        changed, on_object = 0, 0
        for batch in datamodule.train_dataloader():
            batch = datamodule.corrupt_on_device(batch)
            assert ("foreground" in batch) == (device == "model" and on_object_prob > 0)
            mask = batch["mask"].bool()
            changed += int(mask.sum())
            on_object += int(mask[..., 12:36, 12:36].sum())
        shares.append(on_object / changed)
    # The object is a quarter of the image, but warps change only textured pixels: anywhere, a
    # third to a half of the changed pixels lie on it; centred on it, most of them.
    assert shares[1] > 0.65 and shares[1] - shares[0] > 0.15


@pytest.mark.parametrize("device", ["loader", "model"])
def test_kept_noise_is_the_same_on_input_and_target(tmp_path, device):
    root = write_objects(tmp_path)

    def first_batch(noise_std: float) -> dict:
        corruption = {"prob": 0.8, "noise_std": noise_std, "device": device}
        datamodule = AnomalyDataModule(
            root=str(root), category="widget", image_size=48, batch_size=6, corruption=corruption
        )
        datamodule.setup("fit")
        return datamodule.corrupt_on_device(next(iter(datamodule.train_dataloader())))

    plain, noisy = first_batch(0.0), first_batch(0.05)
    # The corruptions are drawn as without noise; the noise comes on top of input and target.
    assert torch.equal(noisy["mask"], plain["mask"])
    assert plain["mask"].sum() > 0
    added = noisy["image"] - plain["image"]
    outside = ~plain["mask"].bool().expand_as(added)
    assert torch.equal(noisy["input"][outside], noisy["image"][outside])
    # Away from the clipped ends (backdrop level 40 of 255), the noise is the asked deviation.
    free = (plain["image"] > 0.2) & (plain["image"] < 0.8)
    assert added[free].std() == pytest.approx(0.05, rel=0.1)
    assert abs(float(added[free].mean())) < 0.005


def test_training_scratches_reach_the_loader_batches(tmp_path):
    root = write_objects(tmp_path)

    def thin_share(scratch_prob: float) -> float:
        """The share of the changed pixels that a 5 x 5 opening removes (thin lines)."""
        corruption = {"prob": 1.0, "on_object_prob": 1.0, "scratch_prob": scratch_prob}
        datamodule = AnomalyDataModule(
            root=str(root), category="widget", image_size=48, batch_size=6, corruption=corruption
        )
        datamodule.setup("fit")
        masks = next(iter(datamodule.train_dataloader()))["mask"][:, 0].numpy().astype(np.uint8)
        kernel = np.ones((5, 5), np.uint8)
        opened = sum(int(cv2.morphologyEx(m, cv2.MORPH_OPEN, kernel).sum()) for m in masks)
        return 1 - opened / masks.sum()

    assert thin_share(1.0) > 0.9 > 0.5 > thin_share(0.0)


def test_scratches_on_the_device_are_refused_in_one_line(tmp_path):
    root = write_objects(tmp_path)
    corruption = {"prob": 0.8, "scratch_prob": 0.3, "device": "model"}
    datamodule = AnomalyDataModule(
        root=str(root), category="widget", image_size=48, corruption=corruption
    )
    with pytest.raises(ConfigError, match="scratch_prob > 0 needs data.corruption.device=loader"):
        datamodule.setup("fit")


def test_unknown_corruption_device_is_one_line():
    with pytest.raises(ConfigError, match="data.corruption.device must be one of loader, model"):
        AnomalyDataModule(root="x", corruption={"device": "gpu"})


class RecordsMasks(ReconstructionLoss):
    """The reconstruction loss, keeping the masks of the training batches it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: list[torch.Tensor] = []

    def forward(self, prediction, target, mask):
        if self.training:
            self.masks.append(mask.detach().clone())
        return super().forward(prediction, target, mask)


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_module_trains_on_batches_corrupted_in_its_hook(tiny_tree, channels_last):
    datamodule = make_datamodule(tiny_tree, corruption={"prob": 1.0, "device": "model"})
    loss = RecordsMasks()
    net = SDCCCMAutoencoder(channels=(8, 16, 24), num_sdc_blocks=1)
    detector = AnomalyDetector(net, AnomalyMap(sigma=1.0))
    optimizer = partial(torch.optim.Adam, lr=1e-3)
    model = AnomalyModule(detector, loss, optimizer, channels_last=channels_last)
    quiet_trainer(max_epochs=1, limit_val_batches=0).fit(model, datamodule=datamodule)
    assert len(loss.masks) == len(datamodule.train_dataloader())
    # Every image was corrupted (prob 1): the masks come from the hook, not the loader.
    assert all((mask.flatten(1).sum(dim=1) > 0).all() for mask in loss.masks)
