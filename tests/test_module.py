"""The Lightning module: validation fits the detector's statistics; one inference path."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from lightning import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from anomaly.anomaly_map import AnomalyMap
from anomaly.detector import AnomalyDetector
from anomaly.errors import NonFiniteError
from anomaly.models.sdc_ccm import SDCCCMAutoencoder
from anomaly.module import AnomalyModule
from anomaly.objective import ReconstructionLoss
from tests.conftest import make_datamodule
from tests.test_metrics import brute_auroc, reference_aupro


def quiet_trainer(**settings) -> Trainer:
    """A CPU trainer without logger, checkpoints or progress bar; `settings` add to (or replace)
    them."""
    quiet = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    return Trainer(**(quiet | settings))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_validation_fits_normal_statistics_of_the_held_out_maps(tiny_tree, precision):
    # With mixed precision too, validation maps in float32, as eval and predict compute them.
    datamodule = make_datamodule(tiny_tree, eval_batch_size=2)
    net = SDCCCMAutoencoder(channels=(8, 16, 24), num_sdc_blocks=1)
    detector = AnomalyDetector(net, AnomalyMap(sigma=1.0), standardize=True)
    model = AnomalyModule(detector, ReconstructionLoss(), partial(torch.optim.Adam, lr=1e-3))
    trainer = quiet_trainer(precision=precision)
    trainer.validate(model, datamodule=datamodule)
    normals = datamodule.val_set.images
    images = torch.stack([normals[i]["image"] for i in range(len(normals))])
    detector.eval()
    with torch.no_grad():
        output_maps, scores, _ = detector(images)  # the path of validation, test and eval
        maps = AnomalyMap(sigma=1.0)(images, net(images))
    assert torch.equal(output_maps, maps)
    std = maps.double().std(0, unbiased=False).float()
    assert torch.allclose(detector.normal_mean, maps.mean(0), atol=1e-6)
    assert torch.allclose(detector.normal_std, std + std.mean(), atol=1e-5)
    expected = ((maps - maps.mean(0)) / (std + std.mean())).flatten(1).amax(1)
    assert torch.allclose(scores, expected, atol=1e-4)


class DivergesAtEpoch(ReconstructionLoss):
    """The reconstruction loss, NaN from epoch `epoch` on (as after an exploding step)."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch, self.current_epoch = epoch, 0

    def forward(self, prediction, target, mask):
        total, terms = super().forward(prediction, target, mask)
        if self.training and self.current_epoch >= self.epoch:
            total = total * float("nan")
        return total, terms


class TellsLossTheEpoch(Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        pl_module.loss.current_epoch = trainer.current_epoch


def small_module(loss: ReconstructionLoss | None = None) -> AnomalyModule:
    net = SDCCCMAutoencoder(channels=(8, 16, 24), num_sdc_blocks=1)
    detector = AnomalyDetector(net, AnomalyMap(sigma=1.0))
    return AnomalyModule(detector, loss or ReconstructionLoss(), partial(torch.optim.Adam, lr=1e-3))


def test_a_late_divergence_stops_at_its_step_and_keeps_the_last_good_checkpoint(
    tiny_tree, tmp_path
):
    datamodule = make_datamodule(tiny_tree)
    model = small_module(DivergesAtEpoch(epoch=2))
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=4,
        logger=False,
        callbacks=[checkpoints, TellsLossTheEpoch()],
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    with pytest.raises(
        NonFiniteError, match=r"the loss is nan at epoch 2, batch 0 \(optimizer step 4\)"
    ):
        trainer.fit(model, datamodule=datamodule)
    last = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1  # the end of the last good epoch
    assert all(torch.isfinite(tensor).all() for tensor in last["state_dict"].values())


def test_non_finite_weights_are_never_saved_and_non_finite_scores_name_the_image(tiny_tree):
    model = small_module()
    with torch.no_grad():
        next(model.detector.net.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="holds NaN or inf .* its checkpoint is not saved"):
        model.on_save_checkpoint({"state_dict": model.state_dict()})
    batch = next(iter(make_datamodule(tiny_tree).test_dataloader()))
    with pytest.raises(NonFiniteError, match=r"widget/test/.*\.png: the anomaly map or score is"):
        model.test_step(batch, 0)


def test_test_metrics_match_an_independent_computation_exact_and_binned(tiny_tree):
    datamodule = make_datamodule(tiny_tree, eval_batch_size=3)
    results = {}
    for thresholds in (None, 2000):
        torch.manual_seed(0)
        model = small_module()
        model = AnomalyModule(
            model.detector, model.loss, model.optimizer, pixel_thresholds=thresholds
        )
        trainer = quiet_trainer()
        trainer.test(model, datamodule=datamodule)
        results[thresholds] = model.test_results
    datamodule.setup("test")
    batches = list(datamodule.test_dataloader())
    model.detector.eval()
    with torch.no_grad():
        outputs = [model.detector(batch["image"]) for batch in batches]
    maps = torch.cat([output[0] for output in outputs])
    scores = torch.cat([output[1] for output in outputs])
    masks = torch.cat([batch["mask"][:, 0] for batch in batches]).long()
    labels = torch.cat([batch["label"] for batch in batches]).long()
    expected = {
        "image_auroc": brute_auroc(scores, labels),
        "pixel_auroc": brute_auroc(maps, masks),
        "pixel_aupro": reference_aupro(maps.numpy(), masks.numpy(), 0.3),
    }
    for key, value in expected.items():
        assert results[None][key] == pytest.approx(value, abs=1e-9), key
        # 2,000 bins over the map's range: close to exact.
        assert results[2000][key] == pytest.approx(value, abs=0.02), key


def test_channels_last_gives_the_same_results_in_the_faster_layout(tiny_tree):
    datamodule = make_datamodule(tiny_tree)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    results = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        reference = small_module()
        model = AnomalyModule(
            reference.detector, reference.loss, reference.optimizer, channels_last=channels_last
        )
        moved = model.on_after_batch_transfer(dict(batch), 0)
        conv = model.detector.net.head[0].weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert moved["input"].is_contiguous(memory_format=torch.channels_last) == channels_last
        loss = model.training_step(moved, 0)
        loss.backward()
        model.detector.eval()
        with torch.no_grad():
            maps, scores, _ = model.detector(moved["image"])
        results.append((loss.detach(), conv.grad.clone(), maps, scores))
    for plain, fast in zip(*results, strict=True):
        assert torch.allclose(plain, fast, rtol=1e-4, atol=1e-5)


class RecordsTargets(ReconstructionLoss):
    """The reconstruction loss, keeping the training targets it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[torch.Tensor] = []

    def forward(self, prediction, target, mask):
        if self.training:
            self.targets.append(target.detach().clone())
        return super().forward(prediction, target, mask)


def test_fitting_sets_the_reference_levels_and_trains_in_matched_levels(tiny_tree):
    # Training images from dark (levels x 0.3) to full: the network restores every target at the
    # reference levels, not at the image's own.
    for i, path in enumerate(sorted((tiny_tree / "widget" / "train" / "good").glob("*.png"))):
        levels = np.asarray(Image.open(path), dtype=np.float64) * (0.3 + 0.06 * i)
        Image.fromarray(levels.round().astype(np.uint8)).save(path)
    datamodule = make_datamodule(tiny_tree)
    net = SDCCCMAutoencoder(channels=(8, 16, 24), num_sdc_blocks=1)
    detector = AnomalyDetector(net, AnomalyMap(sigma=1.0), normalize_levels=True)
    loss = RecordsTargets()
    model = AnomalyModule(detector, loss, partial(torch.optim.Adam, lr=1e-3))
    quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(
        model, datamodule=datamodule
    )
    mean, spread = datamodule.training_levels()
    assert torch.allclose(detector.reference_levels, torch.tensor([mean, spread]))
    targets = torch.cat(loss.targets).flatten(1)
    assert len(targets) == 8
    # Matched by the corrupted input's levels, so close to (not exactly at) the reference.
    assert torch.allclose(targets.mean(1), torch.full((8,), mean), atol=0.03)
    assert torch.allclose(targets.std(1, correction=0), torch.full((8,), spread), atol=0.03)
