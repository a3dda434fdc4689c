"""Re-test a checkpoint and write the same outputs as training: `python eval.py ckpt_path=PATH`.

Model and data are restored from the checkpoint; the data keys of `conf/eval.yaml` replace the
checkpoint's, e.g. `python eval.py ckpt_path=PATH data.root=/data/mvtec data.category=pill`.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from anomaly.runtime import exit_on_user_error
from anomaly.tasks import evaluate, format_metrics

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        metrics = evaluate(cfg)
    log.info("test metrics:\n%s", format_metrics(metrics))


if __name__ == "__main__":
    main()
