"""Every config option composes and instantiates (no training): presets stay valid."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def composed(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):  # outside a run, Hydra's runtime folders do not exist
        cfg.paths.root_dir = "/tmp/anomaly-config-test"
        cfg.paths.output_dir = "/tmp/anomaly-config-test/run"
    return cfg


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_presets_instantiate(experiment):
    cfg = composed([f"experiment={experiment}", "data.root=/data/mvtec"])
    model = instantiate(cfg.model)
    datamodule = instantiate(cfg.data)
    assert model.name in experiment and datamodule.category == "capsule"
    assert datamodule.image_size in (128, 256)
    assert cfg.trainer.max_time is not None
    # A run stopped by the clock has no known length: a schedule over max_epochs would barely
    # decay, and selecting on the restoration loss would then favour copying networks.
    assert cfg.model.scheduler is None
    assert cfg.callbacks.model_checkpoint.monitor == "val/pixel_aupro"


def test_default_model_anneals_over_the_run_and_selects_on_validation_loss():
    cfg = composed(["trainer.max_epochs=7"])
    model = instantiate(cfg.model)
    scheduler = model.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert model.name == "sdc_ccm" and scheduler.T_max == 7
    assert (cfg.callbacks.model_checkpoint.monitor, cfg.callbacks.model_checkpoint.mode) == (
        "val/loss",
        "min",
    )
    assert cfg.callbacks.last_checkpoint.filename == "last"


@pytest.mark.parametrize("model", ["residual_ae", "sdc_ccm"])
@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "ddp_sim"])
@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb", "many_loggers"])
def test_groups_compose(model, trainer, logger):
    cfg = composed([f"model={model}", f"trainer={trainer}", f"logger={logger}", "debug=fast"])
    assert cfg.model.name == model and cfg.trainer.use_distributed_sampler is False
    assert cfg.data.corruption.prob == (0.0 if model == "residual_ae" else 0.8)
    assert all("_target_" in entry for entry in cfg.logger.values())
    assert cfg.data.image_size == 32 and cfg.trainer.max_epochs == 1
