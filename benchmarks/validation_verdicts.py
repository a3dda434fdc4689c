"""How many held-out normals and synthetic anomalies a checkpoint's threshold calls anomalous, on
validation only (the test split is not read), and what each threshold method would call.

Rebuilds the run's validation set from the checkpoint's data config (its held-out normals and
this version's synthetic anomalies), scores it as validation does, and prints one JSON line per
checkpoint: the shares called anomalous by the saved threshold, and by `f1_max` and `fpr` (1%)
calibrated on these scores.

    python benchmarks/validation_verdicts.py --ckpt <checkpoint> [<checkpoint> ...] \
        [--root ../shared/data/mvtec] [--dtd-root ../shared/data/dtd]
"""

import argparse
import json
import sys

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from anomaly.detector import calibrate_threshold
from anomaly.errors import AnomalyError
from anomaly.tasks import load_detector


def shares(scores: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict:
    called = scores.double() >= threshold
    return {
        "threshold": threshold,
        "normals_called_anomalous": float(called[labels == 0].double().mean()),
        "anomalies_called_anomalous": float(called[labels == 1].double().mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", nargs="+", required=True, help="checkpoints written by train.py")
    parser.add_argument("--root", help="replaces the checkpoint's data.root")
    parser.add_argument("--dtd-root", help="replaces the checkpoint's data.dtd_root")
    args = parser.parse_args(argv)
    for path in args.ckpt:
        try:
            detector, config = load_detector(path)
            data = OmegaConf.create(config["data"])
            data.num_workers, data.persistent_workers = 0, False
            data.root = args.root or data.root
            data.dtd_root = args.dtd_root or data.dtd_root
            datamodule = instantiate(data)
            datamodule.setup("fit")
        except AnomalyError as error:
            sys.exit(f"error: {error}")
        val = datamodule.val_set
        images = torch.stack([val[i]["image"] for i in range(len(val))])
        labels = torch.tensor([val[i]["label"] for i in range(len(val))])
        with torch.inference_mode():
            scores = torch.cat([detector(batch)[1] for batch in images.split(32)])
        result = {
            "ckpt": path,
            "saved": shares(scores, labels, float(detector.threshold)),
            **{
                m: shares(scores, labels, calibrate_threshold(scores, labels, m))
                for m in ("f1_max", "fpr")
            },
        }
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
