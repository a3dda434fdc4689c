"""The learning rate over the run's budget: epochs, steps or the clock, and across a resume."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from lightning import Callback
from lightning.pytorch.callbacks import ModelCheckpoint, Timer

from anomaly.callbacks import BudgetSchedule, budget_progress
from anomaly.errors import ConfigError
from tests.conftest import make_datamodule
from tests.test_module import quiet_trainer, small_module

BASE_LR = 1e-3  # small_module's Adam rate


def cosine(progress: float, final_share: float = 0.0) -> float:
    return final_share + (1 - final_share) * (1 + math.cos(math.pi * progress)) / 2


class RecordsRates(Callback):
    """The rate each training batch ran with, and the (epoch, batch) it ran at."""

    def __init__(self) -> None:
        self.rates: list[tuple[int, int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.rates.append((trainer.current_epoch, batch_idx, lr))


def test_the_factor_falls_from_one_to_the_final_share():
    schedule = BudgetSchedule("cosine", final_share=0.1)
    factors = [schedule.factor(p / 10) for p in range(11)]
    assert factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(factors, factors[1:], strict=False))
    assert BudgetSchedule("constant").factor(0.7) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"shape": "linear"}, "shape must be one of"), ({"final_share": 1.5}, "final_share")],
)
def test_bad_settings_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        BudgetSchedule(**kwargs)


def test_progress_is_the_largest_share_of_the_budget_spent(monkeypatch):
    timer = Timer(duration="00:00:01:40")
    monkeypatch.setattr(timer, "time_elapsed", lambda stage="train": 30.0)
    monkeypatch.setattr(timer, "time_remaining", lambda stage="train": 70.0)
    trainer = SimpleNamespace(
        max_epochs=10, max_steps=-1, num_training_batches=4, current_epoch=1, global_step=6,
        callbacks=[timer],
    )  # fmt: skip
    assert budget_progress(trainer, batch_idx=2) == pytest.approx(0.3)  # time: 30 of 100 s
    trainer.current_epoch = 5
    assert budget_progress(trainer, batch_idx=2) == pytest.approx(0.55)  # epochs: 5.5 of 10
    trainer.max_steps = 8
    assert budget_progress(trainer, batch_idx=2) == pytest.approx(0.75)  # steps: 6 of 8
    trainer.global_step = 20
    assert budget_progress(trainer, batch_idx=2) == 1.0


def test_an_epoch_budget_anneals_batch_by_batch(tiny_tree):
    datamodule = make_datamodule(tiny_tree)
    rates = RecordsRates()
    callbacks = [BudgetSchedule("cosine", 0.05), rates]
    quiet_trainer(max_epochs=3, limit_val_batches=0, callbacks=callbacks).fit(
        small_module(), datamodule=datamodule
    )
    batches = len(datamodule.train_dataloader())
    assert len(rates.rates) == 3 * batches
    for epoch, batch, lr in rates.rates:
        expected = BASE_LR * cosine((epoch + batch / batches) / 3, 0.05)
        assert lr == pytest.approx(expected, rel=1e-9)


def test_a_time_budget_ends_on_an_annealed_rate(tiny_tree):
    rates = RecordsRates()
    trainer = quiet_trainer(
        max_epochs=10_000, max_time="00:00:00:03", limit_val_batches=0,
        callbacks=[BudgetSchedule("cosine"), rates],
    )  # fmt: skip
    trainer.fit(small_module(), datamodule=make_datamodule(tiny_tree))
    lrs = [lr for _, _, lr in rates.rates]
    assert len(lrs) > 5 and lrs[0] == pytest.approx(BASE_LR, rel=0.05)
    # The rate follows the clock, not the epochs (0.1% of which are done), down to nearly zero.
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert lrs[-1] < 0.1 * BASE_LR


def test_a_resumed_run_goes_on_with_the_same_rates(tiny_tree, tmp_path):
    def fit(ckpt_path=None) -> RecordsRates:
        rates = RecordsRates()
        saving = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
        trainer = quiet_trainer(
            max_epochs=4, enable_checkpointing=True,
            callbacks=[BudgetSchedule("cosine"), rates, saving],
        )  # fmt: skip
        trainer.fit(small_module(), datamodule=make_datamodule(tiny_tree), ckpt_path=ckpt_path)
        return rates

    whole = fit().rates
    resumed = fit(ckpt_path=str(tmp_path / "epoch=1.ckpt")).rates
    expected = [rate for rate in whole if rate[0] >= 2]
    assert [step for *step, _ in resumed] == [step for *step, _ in expected]
    assert [lr for *_, lr in resumed] == pytest.approx([lr for *_, lr in expected], rel=1e-9)
