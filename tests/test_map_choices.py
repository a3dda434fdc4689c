"""benchmarks/map_choices.py: its scores against a direct computation, and its one-line error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.map_choices import score

ROOT = Path(__file__).resolve().parents[1]


def pairwise_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    positive, negative = scores[labels == 1], scores[labels == 0]
    greater = (positive[:, None] > negative[None, :]).double()
    ties = (positive[:, None] == negative[None, :]).double()
    return float((greater + 0.5 * ties).mean())


def test_score_standardizes_by_the_normal_maps_and_takes_the_maximum():
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(12, 3, 16, 16, generator=generator)
    normal = (clean, clean + 0.05 * torch.rand(12, 3, 16, 16, generator=generator))
    images = torch.rand(10, 3, 16, 16, generator=generator)
    outputs = images + 0.1 * torch.rand(10, 3, 16, 16, generator=generator)
    masks = (torch.rand(10, 16, 16, generator=generator) > 0.8).long()
    labels = torch.tensor([0, 1] * 5)
    result = score((1.0, 0.0, 0.0, 0.0), normal, (images, outputs, masks, labels))
    # Squared error averaged over channels, no smoothing; spread floored by its mean.
    normal_maps = (normal[0] - normal[1]).pow(2).mean(1)
    mean, std = normal_maps.mean(0), normal_maps.std(0, unbiased=False)
    maps = (images - outputs).pow(2).mean(1)
    scores = ((maps - mean) / (std + std.mean())).flatten(1).amax(1)
    assert abs(result["image_auroc"] - round(pairwise_auroc(scores, labels), 4)) < 1e-9
    pixel = pairwise_auroc(maps.flatten(), masks.flatten())
    assert abs(result["pixel_auroc"] - round(pixel, 4)) < 1e-9


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "map_choices.py"), "--ckpt"]
    missing, garbage = tmp_path / "none.ckpt", tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    done = subprocess.run([*command, str(missing)], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip() == f"{missing}: checkpoint file does not exist"
    done = subprocess.run([*command, str(garbage)], capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith(f"{garbage}: not a readable checkpoint")
    assert len(done.stderr.strip().splitlines()) == 1
