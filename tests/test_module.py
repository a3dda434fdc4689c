"""The Lightning module: validation statistics and one inference path."""

from __future__ import annotations

from functools import partial

import torch
from lightning import Trainer

from anomaly.anomaly_map import AnomalyScorer
from anomaly.data.datamodule import AnomalyDataModule
from anomaly.models.losses import ReconstructionLoss
from anomaly.models.sdc_ccm import SDCCCMAutoencoder
from anomaly.module import ReconstructionModule


def test_validation_fits_normal_statistics_of_the_held_out_maps(tiny_tree):
    datamodule = AnomalyDataModule(
        root=str(tiny_tree),
        category="widget",
        image_size=32,
        batch_size=4,
        eval_batch_size=2,
        val_fraction=0.25,
    )
    model = ReconstructionModule(
        net=SDCCCMAutoencoder(channels=(8, 16, 24), num_sdc_blocks=1),
        loss=ReconstructionLoss(),
        scorer=AnomalyScorer(sigma=1.0, standardize_score=True),
        optimizer=partial(torch.optim.Adam, lr=1e-3),
    )
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.validate(model, datamodule=datamodule)
    normals = datamodule.val_set.images
    images = torch.stack([normals[i]["image"] for i in range(len(normals))])
    model.eval()
    with torch.no_grad():
        output = model(images)  # the same path as validation, test and predict
        maps, _ = AnomalyScorer(sigma=1.0)(images, model.net(images))
    assert torch.equal(output["anomaly_map"], maps)
    std = maps.double().std(0, unbiased=False).float()
    assert torch.allclose(model.scorer.normal_mean, maps.mean(0), atol=1e-6)
    assert torch.allclose(model.scorer.normal_std, std + std.mean(), atol=1e-5)
    expected = ((maps - maps.mean(0)) / (std + std.mean())).flatten(1).amax(1)
    assert torch.allclose(output["pred_score"], expected, atol=1e-4)
