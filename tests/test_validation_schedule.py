"""When validation runs: at most a share of the time, always after the first and last epochs."""

from __future__ import annotations

import time

import pytest
from lightning import Callback

from anomaly.callbacks import ValidationSchedule
from tests.conftest import make_datamodule
from tests.test_module import quiet_trainer, small_module


class SlowValidation(Callback):
    """Makes every validation take `seconds` longer (every training batch `train_seconds`) and
    records the epochs validated."""

    def __init__(self, seconds: float, train_seconds: float = 0.0) -> None:
        self.seconds, self.train_seconds = seconds, train_seconds
        self.epochs, self.last_trained = [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        time.sleep(self.train_seconds)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.last_trained = trainer.current_epoch

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            time.sleep(self.seconds)
            self.epochs.append(trainer.current_epoch)


def validated_epochs(tiny_tree, schedule: ValidationSchedule | None, **trainer_args) -> list:
    """The epochs validated in a fit of one-batch epochs (the last trained one appended last)."""
    slow = SlowValidation(
        trainer_args.pop("validation_seconds", 0.0), trainer_args.pop("train_seconds", 0.0)
    )
    callbacks = [slow] if schedule is None else [schedule, slow]
    trainer = quiet_trainer(
        num_sanity_val_steps=0,
        limit_train_batches=1,
        callbacks=callbacks,
        **trainer_args,
    )
    trainer.fit(small_module(), datamodule=make_datamodule(tiny_tree))
    return [*slow.epochs, slow.last_trained]


def test_costly_validation_runs_after_the_first_and_the_last_epoch_only(tiny_tree):
    # 0.5 s of validation may follow no less than 5 s of training at a 10% share: these epochs
    # of one batch take a small fraction of that.
    epochs = validated_epochs(
        tiny_tree, ValidationSchedule(max_share=0.1), max_epochs=6, validation_seconds=0.5
    )
    assert epochs == [0, 5, 5]


def test_cheap_validation_runs_every_epoch(tiny_tree):
    # Epochs of 0.5 s next to a validation of a few batches of a tiny network.
    epochs = validated_epochs(
        tiny_tree, ValidationSchedule(max_share=1.0), max_epochs=4, train_seconds=0.5
    )
    assert epochs == [0, 1, 2, 3, 3]


def test_a_time_budget_stop_is_validated(tiny_tree):
    epochs = validated_epochs(
        tiny_tree,
        ValidationSchedule(max_share=0.01),
        max_epochs=10_000,
        max_time="00:00:00:03",
        validation_seconds=0.2,
    )
    *validated, last = epochs
    assert last > 3 and validated[0] == 0 and validated[-1] == last
    # Between them only epochs within a couple of batches of the stop (one-batch epochs here,
    # whose times vary on a busy machine), never in the first half of the budget.
    assert all(epoch > last // 2 for epoch in validated[1:])


def test_an_explicit_lightning_frequency_is_left_alone(tiny_tree):
    epochs = validated_epochs(
        tiny_tree, ValidationSchedule(max_share=0.1), max_epochs=6, check_val_every_n_epoch=2
    )
    assert epochs == [1, 3, 5, 5]
    assert validated_epochs(tiny_tree, None, max_epochs=3) == [0, 1, 2, 2]


def test_max_share_must_be_a_fraction():
    with pytest.raises(ValueError, match="max_share must be in"):
        ValidationSchedule(max_share=0.0)
