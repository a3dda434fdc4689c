"""Every config option composes and builds (no training): presets stay valid, groups stay apart."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from anomaly.config_checks import check_training_config
from anomaly.errors import ConfigError
from anomaly.tasks import build_detector, build_module, map_for_eval, score_for_eval

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
CPU_EXPERIMENTS = [e for e in EXPERIMENTS if e.endswith("_cpu")]
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


def composed(overrides: list[str], config: str = "train"):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):  # outside a run, Hydra's runtime folders do not exist
        cfg.paths.root_dir = "/tmp/anomaly-config-test"
        cfg.paths.output_dir = "/tmp/anomaly-config-test/run"
    return cfg


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_presets_build(experiment):
    cfg = composed([f"experiment={experiment}", "data.root=/data/mvtec"])
    model = build_module(cfg.model)
    check_training_config(cfg, model.detector.net.stride)
    datamodule = instantiate(cfg.data)
    assert datamodule.category == "capsule" and datamodule.image_size in (128, 256)
    assert model.name in experiment or experiment in ("capsule_cpu", "capsule_gpu")
    assert cfg.trainer.max_time is not None
    # A preset picks size, budget and hardware; the recipe is the model's own, but for its width.
    plain = composed([f"model={cfg.model.name}"])
    for key in cfg.model:
        if key != "net":
            assert cfg.model[key] == plain.model[key], key
    assert cfg.model.anomaly_map.sigma is None
    assert build_detector(cfg.model).anomaly_map.sigma_for(128, 128) == 1.0


@pytest.mark.parametrize("experiment", CPU_EXPERIMENTS)
def test_cpu_presets_train_with_the_real_data_batch(experiment):
    # The batch is part of the recipe on a CPU (steps in a time budget), not of the preset.
    preset = composed([f"experiment={experiment}", "data.root=/data/mvtec"])
    plain = composed(["data=mvtec", "data.root=/data/mvtec"])
    assert preset.data.batch_size == plain.data.batch_size
    assert plain.data.batch_size < composed([]).data.batch_size  # the built-in set keeps its own


@pytest.mark.parametrize("experiment", CPU_EXPERIMENTS)
def test_cpu_presets_train_in_bfloat16_and_the_plain_trainer_in_float32(experiment):
    # Hardware: the presets' CPU runs bfloat16 natively; a CPU without it keeps float32.
    preset = composed([f"experiment={experiment}", "data.root=/data/mvtec"])
    assert preset.trainer.precision == "bf16-mixed"
    assert composed(["data=mvtec", "data.root=/data/mvtec"]).trainer.precision == "32-true"


def test_default_model_anneals_over_the_run_and_selects_on_validation_loss():
    cfg = composed(["trainer.max_epochs=7"])
    schedule = instantiate(cfg.callbacks.lr_schedule)
    assert cfg.model.name == "sdc_ccm"
    assert (schedule.shape, schedule.final_share) == ("cosine", 0.0)
    assert (cfg.callbacks.model_checkpoint.monitor, cfg.callbacks.model_checkpoint.mode) == (
        "val/loss",
        "min",
    )
    assert cfg.callbacks.last_checkpoint.filename == "last"


def test_model_configs_configure_the_model_only():
    # Choosing a model changes nothing outside `model`: the other groups only read its keys.
    configs = {}
    for model in MODELS:
        text = (CONF / "model" / f"{model}.yaml").read_text()
        assert "@package" not in text
        cfg = OmegaConf.to_container(composed([f"model={model}"]), resolve=False)
        cfg.pop("model")
        cfg["hydra"] = None  # records the choice itself
        configs[model] = cfg
    first, *others = configs.values()
    assert all(other == first for other in others)


@pytest.mark.parametrize("model", MODELS)
def test_the_model_objective_sets_the_corruption_and_the_selection(model):
    changes = ["model.objective.corruption.prob=0.3", "model.objective.corruption.scratch_prob=0.2"]
    cfg = composed([f"model={model}", *changes])
    assert cfg.data.corruption.prob == 0.3 and cfg.data.corruption.scratch_prob == 0.2
    corruption = instantiate(cfg.data).corruption
    assert corruption["prob"] == 0.3 and corruption["scratch_prob"] == 0.2
    # Both models keep the lowest restoration loss of the held-out normals by default.
    assert cfg.callbacks.model_checkpoint.monitor == "val/loss"
    assert cfg.callbacks.model_checkpoint.mode == "min"
    cfg = composed([f"model={model}", "model.selection.monitor=val/pixel_aupro"])
    assert cfg.callbacks.model_checkpoint.monitor == "val/pixel_aupro"


def test_eval_config_holds_only_what_eval_uses():
    cfg = composed(["ckpt_path=/x.ckpt", "data.category=pill"], config="eval")
    assert "model" not in cfg and set(cfg.callbacks) == {"test_results"}
    assert cfg.data.category == "pill" and cfg.data.root is None


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "ddp_sim"])
@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb", "many_loggers"])
def test_groups_compose(model, trainer, logger):
    cfg = composed([f"model={model}", f"trainer={trainer}", f"logger={logger}", "debug=fast"])
    assert cfg.model.name == model and cfg.trainer.use_distributed_sampler is False
    assert cfg.data.corruption.prob == (0.0 if model == "residual_ae" else 0.8)
    assert all("_target_" in entry for entry in cfg.logger.values())
    assert cfg.data.image_size == 32 and cfg.trainer.max_epochs == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data=mvtec"], "data.root=None is out of range"),
        (["trainer.max_epochs=0"], "trainer.max_epochs=0 is out of range"),
        (["trainer.max_epochs=-1"], "trainer.max_epochs=-1 is out of range"),
        (["model.lr_schedule.shape=linear"], "model.lr_schedule.shape='linear' is out of range"),
        (["model.lr_schedule.final_share=2"], "model.lr_schedule.final_share=2 is out of range"),
        (["model.weight_average.decay=1"], "model.weight_average.decay=1 is out of range"),
        (["data.batch_size=0"], "data.batch_size=0 is out of range: a batch size >= 1"),
        (["data.eval_batch_size=-2"], "data.eval_batch_size=-2"),
        (["data.num_workers=-1"], "data.num_workers=-1"),
        (["data.image_size=0"], "data.image_size=0 is out of range"),
        (["data.image_size=66"], "a multiple of 4 \\(the network's stride\\)"),
        (["model=residual_ae", "data.image_size=[64,72]"], "multiple of 16"),
        (
            ["data.val_fraction=1.0"],
            "data.val_fraction=1.0 is out of range: a number in \\(0, 1\\)",
        ),
        (["model.objective.corruption.prob=2"], "model.objective.corruption.prob=2"),
        (["model.objective.corruption.texture_prob=-1"], "corruption.texture_prob=-1"),
        (["model.objective.corruption.prob=often"], "corruption.prob='often' is out of range"),
        (["model.objective.corruption.prob=nan"], "corruption.prob=nan is out of range"),
        (["data.corruption.device=gpu"], "data.corruption.device='gpu' is out of range: loader"),
        (["data.augment.rotate=-5"], "data.augment.rotate=-5"),
        (["model.score.top_share=0"], "score.top_share must be a share in \\(0, 1\\], got 0"),
        (["model.score.top_share=most"], "score.top_share must be a share in .*, got 'most'"),
        (["model.score.top_k=5"], "set score.top_k or score.top_share, not both"),
        (["threshold.method=youden"], "threshold.method='youden' is out of range"),
        (["threshold.fpr=1.0"], "threshold.fpr=1.0 is out of range"),
        (
            ["callbacks.validation_schedule.max_share=0"],
            "callbacks.validation_schedule.max_share=0 is out of range",
        ),
    ],
)
def test_out_of_range_settings_are_config_errors_naming_the_key(overrides, message):
    cfg = composed(overrides)
    with pytest.raises(ConfigError, match=message):
        check_training_config(cfg, build_module(cfg.model).detector.net.stride)


@pytest.mark.parametrize("model", MODELS)
def test_the_defaults_and_a_time_budget_without_epoch_limit_pass_the_checks(model):
    for overrides in (
        [f"model={model}"],
        [
            f"model={model}",
            "trainer.max_epochs=-1",
            "trainer.max_time=00:00:01:00",
        ],
    ):
        cfg = composed(overrides)
        check_training_config(cfg, build_module(cfg.model).detector.net.stride)


def test_eval_map_keys_replace_the_checkpoints_smoothing_and_are_checked_first():
    saved = {"l2": 10.0, "ssim": 1.0, "sigma": None}  # a checkpoint from before side_per_sigma
    cfg = OmegaConf.create(
        {"recalibrate": True, "anomaly_map": {"sigma": None, "side_per_sigma": None}}
    )
    assert map_for_eval(saved, cfg) == saved
    cfg.anomaly_map.side_per_sigma = 128
    assert map_for_eval(saved, cfg) == {**saved, "side_per_sigma": 128}
    cfg.anomaly_map.side_per_sigma, cfg.anomaly_map.sigma = None, 0.5
    assert map_for_eval(saved, cfg) == {**saved, "sigma": 0.5, "side_per_sigma": 64.0}
    cfg.anomaly_map.sigma = -1.0
    with pytest.raises(ConfigError, match="anomaly map sigma must be >= 0 pixels or null"):
        map_for_eval(saved, cfg)
    cfg.anomaly_map.sigma, cfg.recalibrate = 1.0, False
    with pytest.raises(ConfigError, match="anomaly_map.sigma takes effect only with recalibrate"):
        map_for_eval(saved, cfg)


def test_eval_score_keys_replace_the_checkpoints_and_are_checked_first():
    saved = {"top_k": None, "top_share": 0.01, "standardize": "auto"}
    score = {"top_k": 1, "top_share": None, "standardize": None}
    cfg = OmegaConf.create({"recalibrate": True, "score": score})
    # top_k replaces the checkpoint's share: the two never stay set together.
    assert score_for_eval(saved, cfg) == {"top_k": 1, "top_share": None, "standardize": "auto"}
    cfg.score.top_k, cfg.score.top_share = None, 2.0
    with pytest.raises(ConfigError, match=r"score.top_share must be a share in \(0, 1\], got 2.0"):
        score_for_eval(saved, cfg)
    cfg.score.top_share, cfg.recalibrate = 0.05, False
    with pytest.raises(ConfigError, match="score.top_share takes effect only with recalibrate"):
        score_for_eval(saved, cfg)
