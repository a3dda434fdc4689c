"""An exponential moving average of the network's weights, validated, kept and tested in their
place (`callbacks.weight_average`, its decay in the model config: `model.weight_average.decay`)."""

from __future__ import annotations

import torch
from lightning import Callback, LightningModule, Trainer
from torch import Tensor, nn

from anomaly.errors import ConfigError


def average_decay(decay: float, updates: int) -> float:
    """The decay of the average's next update, after `updates` of them: it grows as
    (1 + n) / (10 + n) up to `decay`, so the average spans about the last tenth of the steps until
    it spans 1 / (1 - decay) of them, whatever the budget, and the first weights soon fade."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class WeightAverage(Callback):
    """Validates, keeps and tests an exponential moving average of the detector's network.

    After every optimizer step the average moves `1 - d` of the way to the network's weights and
    normalization statistics (`d` from `average_decay`). Validation swaps the average into the
    network, so the normal-map statistics, the threshold and the checkpoint that validation keeps
    are the average's; the next training step swaps the network's own weights back. The average
    and whether it is swapped in are the callback's state in every checkpoint, so a resumed run
    goes on from both as they were.

    Args:
        decay: the largest share of the average kept at an update, in (0, 1); None: no average.
    """

    def __init__(self, decay: float | None = None) -> None:
        if decay is not None and not 0 < decay < 1:
            raise ConfigError(f"model.weight_average.decay must be in (0, 1) or null, got {decay}")
        self.decay = decay
        self._average: dict[str, Tensor] | None = None
        self._updates = 0
        self._swapped = False
        self._restored: dict | None = None

    @staticmethod
    def _weights(pl_module: LightningModule) -> dict[str, Tensor]:
        net: nn.Module = pl_module.detector.net
        # Views of the parameters and buffers: writing into them writes into the network.
        return net.state_dict(keep_vars=False)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.decay is None:
            return
        weights = self._weights(pl_module)
        # On the network's device, in its memory format; a resumed run's average replaces them.
        self._average = {name: value.detach().clone() for name, value in weights.items()}
        self._updates, self._swapped = 0, False
        if self._restored is not None:
            for name, value in self._restored["average"].items():
                self._average[name].copy_(value)
            self._updates = self._restored["updates"]
            self._swapped = self._restored["swapped"]
            self._restored = None

    @torch.no_grad()
    def _swap(self, pl_module: LightningModule) -> None:
        for name, value in self._weights(pl_module).items():
            kept = self._average[name].clone()
            self._average[name].copy_(value)
            value.copy_(kept)
        self._swapped = not self._swapped

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._average is None:
            return
        weight = 1.0 - average_decay(self.decay, self._updates)
        for name, value in self._weights(pl_module).items():
            if value.is_floating_point():
                self._average[name].lerp_(value, weight)
            else:  # counters such as BatchNorm's num_batches_tracked
                self._average[name].copy_(value)
        self._updates += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._average is not None and self._swapped:
            self._swap(pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._average is not None and not self._swapped:
            self._swap(pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The network ends on the average, as the last validation saw it.
        if self._average is not None and not self._swapped:
            self._swap(pl_module)

    def state_dict(self) -> dict:
        if self._average is None:
            return {}
        return {"average": self._average, "updates": self._updates, "swapped": self._swapped}

    def load_state_dict(self, state_dict: dict) -> None:
        # Applied in on_fit_start, once the network is on its device.
        self._restored = state_dict if state_dict and self.decay is not None else None
