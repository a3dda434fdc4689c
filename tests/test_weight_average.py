"""The moving average of the network's weights: what it averages, who sees it, and a resume."""

from __future__ import annotations

import pytest
import torch
from lightning import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from anomaly.errors import ConfigError
from anomaly.weight_average import WeightAverage, average_decay
from tests.conftest import make_datamodule
from tests.test_module import quiet_trainer, small_module


def snapshot(pl_module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pl_module.detector.net.state_dict().items()}


class RecordsWeights(Callback):
    """The network's weights after every training step, at every validation's start and at
    every training batch's start, in order (placed after WeightAverage, so it sees its swaps)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, torch.Tensor]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.events.append(("batch_start", snapshot(pl_module)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.events.append(("step", snapshot(pl_module)))

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.events.append(("validation", snapshot(pl_module)))


def expected_average(start: dict, steps: list[dict[str, torch.Tensor]], decay: float) -> dict:
    """The average of the weights each of `steps` left, from the `start` weights, computed
    here."""
    average = {k: v.clone() for k, v in start.items()}
    for n, weights in enumerate(steps):
        d = min(decay, (1 + n) / (10 + n))
        for key, value in weights.items():
            if value.is_floating_point():
                average[key] = d * average[key] + (1 - d) * value
            else:
                average[key] = value.clone()
    return average


def assert_same(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def differ(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_the_decay_grows_to_its_cap():
    assert average_decay(0.999, 0) == pytest.approx(0.1)
    assert average_decay(0.999, 90) == pytest.approx(0.91)
    assert average_decay(0.9, 90) == 0.9
    assert all(average_decay(0.99, n) <= average_decay(0.99, n + 1) for n in range(2000))


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 2.0])
def test_a_decay_outside_the_open_unit_interval_is_refused(decay):
    with pytest.raises(ConfigError, match="model.weight_average.decay must be in \\(0, 1\\)"):
        WeightAverage(decay)


def test_validation_sees_the_average_and_training_goes_on_from_its_own_weights(tiny_tree):
    decay = 0.5
    records = RecordsWeights()
    model = small_module()
    start = snapshot(model)
    trainer = quiet_trainer(max_epochs=3, callbacks=[WeightAverage(decay), records])
    trainer.fit(model, datamodule=make_datamodule(tiny_tree))

    steps, validations = [], 0
    for i, (event, weights) in enumerate(records.events):
        if event == "step":
            steps.append(weights)
        elif event == "validation":
            validations += 1
            assert_same(weights, expected_average(start, steps, decay))
            assert differ(weights, steps[-1])
        elif steps and records.events[i - 1][0] == "validation":
            assert_same(weights, steps[-1])  # the network's own weights are back
    assert validations == 3 and len(steps) >= 6
    # Training ends on the average, as the last validation saw it.
    assert_same(snapshot(model), expected_average(start, steps, decay))


def test_checkpoints_keep_the_average_and_a_resume_goes_on_from_both(tiny_tree, tmp_path):
    decay = 0.9
    saving = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    records = RecordsWeights()
    model = small_module()
    start = snapshot(model)
    trainer = quiet_trainer(
        max_epochs=2, enable_checkpointing=True, callbacks=[WeightAverage(decay), records, saving]
    )
    trainer.fit(model, datamodule=make_datamodule(tiny_tree))
    steps = [weights for event, weights in records.events if event == "step"]
    first_epoch = steps[: len(steps) // 2]

    # The checkpoint of epoch 0, saved at its validation: the average as the network's weights,
    # the network's own weights in the callback's state.
    checkpoint = torch.load(tmp_path / "epoch=0.ckpt", weights_only=True)
    net = {k[len("detector.net."):]: v for k, v in checkpoint["state_dict"].items()
           if k.startswith("detector.net.")}  # fmt: skip
    assert_same(net, expected_average(start, first_epoch, decay))
    state = next(v for k, v in checkpoint["callbacks"].items() if "WeightAverage" in k)
    assert state["swapped"] and state["updates"] == len(first_epoch)
    assert_same(state["average"], first_epoch[-1])

    resumed_records = RecordsWeights()
    resumed = quiet_trainer(max_epochs=2, callbacks=[WeightAverage(decay), resumed_records])
    resumed.fit(
        small_module(), datamodule=make_datamodule(tiny_tree),
        ckpt_path=str(tmp_path / "epoch=0.ckpt"), weights_only=True,
    )  # fmt: skip
    first = next(w for event, w in resumed_records.events if event == "batch_start")
    assert_same(first, first_epoch[-1])  # training goes on from the network's own weights
    later = [w for event, w in resumed_records.events if event == "step"]
    final = expected_average(start, first_epoch + later, decay)
    assert_same(snapshot(resumed.lightning_module), final)


def test_without_a_decay_nothing_changes(tiny_tree):
    records = RecordsWeights()
    model = small_module()
    quiet_trainer(max_epochs=1, callbacks=[WeightAverage(None), records]).fit(
        model, datamodule=make_datamodule(tiny_tree)
    )
    steps = [weights for event, weights in records.events if event == "step"]
    validation = next(w for event, w in records.events if event == "validation")
    assert_same(validation, steps[-1])
    assert_same(snapshot(model), steps[-1])
