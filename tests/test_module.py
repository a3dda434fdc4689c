"""The Lightning module: validation fits the detector's statistics; one inference path."""

from __future__ import annotations

from functools import partial

import torch
from lightning import Trainer

from anomaly.anomaly_map import AnomalyMap
from anomaly.detector import AnomalyDetector
from anomaly.models.sdc_ccm import SDCCCMAutoencoder
from anomaly.module import AnomalyModule
from anomaly.objective import ReconstructionLoss
from tests.conftest import make_datamodule


def test_validation_fits_normal_statistics_of_the_held_out_maps(tiny_tree):
    datamodule = make_datamodule(tiny_tree, eval_batch_size=2)
    net = SDCCCMAutoencoder(channels=(8, 16, 24), num_sdc_blocks=1)
    detector = AnomalyDetector(net, AnomalyMap(sigma=1.0), standardize=True)
    model = AnomalyModule(detector, ReconstructionLoss(), partial(torch.optim.Adam, lr=1e-3))
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
