"""Train a model, then test its best checkpoint: `python train.py [group=option] [key=value]`.

Examples:
    python train.py                         # Model II (SDC-CCM) on the built-in synthetic data
    python train.py model=residual_ae       # Model I
    python train.py data=mvtec data.root=/data/mvtec data.category=capsule
"""

from __future__ import annotations

import logging
import signal
import sys

import hydra
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from anomaly.runtime import exit_on_user_error
from anomaly.tasks import format_metrics, train

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        with exit_on_user_error():
            test_metrics, val_metrics = train(cfg)
    except SIGTERMException:
        # Preempted: last.ckpt is saved; the same command in the same folder resumes.
        log.warning(
            "stopped by SIGTERM; last.ckpt saved, rerun in %s to resume", cfg.paths.output_dir
        )
        sys.exit(128 + signal.SIGTERM)
    if test_metrics:
        log.info("test metrics:\n%s", format_metrics(test_metrics))
    # A sweeper optimizes a validation metric: choosing on the test split would leak it.
    return val_metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
