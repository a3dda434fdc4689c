"""Re-test a checkpoint and write the same outputs as training: `python eval.py ckpt_path=PATH`.

The data configuration is restored from the checkpoint unless overridden, e.g.
`python eval.py ckpt_path=PATH data.root=/data/mvtec data.category=pill`.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from anomaly.tasks import USER_ERRORS, evaluate, format_metrics, one_line

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        metrics = evaluate(cfg)
    except USER_ERRORS as error:
        sys.exit(f"error: {one_line(error)}")
    log.info("test metrics:\n%s", format_metrics(metrics))


if __name__ == "__main__":
    main()
