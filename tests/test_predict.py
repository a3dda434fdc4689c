"""`python -m anomaly.predict`: new images in, verdicts, 0-1 scores and heatmaps out."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly.predict import main
from anomaly.visualization import OVERLAY_MIN_SIDE


def read_rows(path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_predictions_on_the_test_split_reproduce_the_run_scores(trained, tmp_path):
    run_dir, best, category = trained
    output = tmp_path / "out"
    assert main([f"ckpt_path={best}", f"input={category / 'test'}", f"output={output}"]) == 0
    predicted = {row["path"]: row for row in read_rows(output / "predictions.csv")}
    expected = read_rows(run_dir / "scores.csv")
    assert len(predicted) == len(expected) == 132
    for row in expected:
        mine = predicted[row["path"]]
        assert float(mine["score"]) == float(row["score"])
        assert float(mine["normalized_score"]) == float(row["normalized_score"])
        assert mine["verdict"] == row["verdict"]
    summary = json.loads((output / "predictions.json").read_text())
    assert summary["failed"] == 0 and len(summary["predictions"]) == 132
    assert summary["threshold"] is not None
    heatmaps = sorted((output / "heatmaps").glob("*.png"))
    assert len(heatmaps) == 132 and heatmaps[0].name == "crack__000.png"
    assert not list(output.rglob("*.tmp"))


def write_odd_images(folder) -> dict[str, tuple[int, int]]:
    """One image per mode and size the line may send, two broken files; {name: (W, H)}."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    (folder / "nested").mkdir()
    sizes = {}
    rgb = rng.integers(0, 256, (70, 50, 3), dtype=np.uint8)
    images = {
        "gray.png": Image.fromarray(rgb[..., 0], "L"),
        "rgba.png": Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA"),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "nested/deep.png": Image.fromarray((rng.integers(0, 65536, (40, 90))).astype(np.uint16)),
        "big.jpg": Image.fromarray(np.repeat(np.repeat(rgb, 6, 0), 6, 1)),
    }
    for name, image in images.items():
        image.save(folder / name)
        sizes[name] = image.size
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes((folder / "gray.png").read_bytes()[:60])
    (folder / "notes.txt").write_text("not an image")
    return sizes


def test_any_mode_and_size_is_scored_and_broken_files_are_reported(trained, tmp_path, capsys):
    _, best, _ = trained
    sizes = write_odd_images(tmp_path / "in")
    output = tmp_path / "out"
    status = main([f"ckpt_path={best}", f"input={tmp_path / 'in'}", f"output={output}"])
    errors = capsys.readouterr().err
    assert status == 1
    assert "empty.png: file is empty" in errors and "truncated.png: unreadable" in errors
    assert "2 of 7 files could not be read" in errors
    rows = read_rows(output / "predictions.csv")
    assert sorted(row["path"].split("in/")[1] for row in rows) == sorted(sizes)
    for row in rows:
        assert np.isfinite(float(row["score"])) and 0 <= float(row["normalized_score"]) <= 1
        assert row["verdict"] in ("normal", "anomalous")
    # The overlay shows each image at its own aspect, >= 256 px on its short side.
    overlay = Image.open(output / "heatmaps" / "nested__deep.png")
    assert min(overlay.size) >= OVERLAY_MIN_SIDE
    assert overlay.size[0] > overlay.size[1]  # 90 x 40: wider than tall


def test_a_glob_and_a_single_file(trained, tmp_path):
    _, best, category = trained
    pattern = str(category / "test" / "*" / "000.png")
    assert main([f"ckpt_path={best}", f"input={pattern}", f"output={tmp_path / 'a'}"]) == 0
    assert len(read_rows(tmp_path / "a" / "predictions.csv")) == 6
    single = category / "test" / "good" / "000.png"
    assert main([f"ckpt_path={best}", f"input={single}", f"output={tmp_path / 'b'}"]) == 0
    assert [p.name for p in (tmp_path / "b" / "heatmaps").iterdir()] == ["000.png"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["input=x", "output=y"], "missing ckpt_path"),
        (["ckpt_path=a", "input=x", "output=y", "colour=red"], "unknown argument 'colour=red'"),
        (["ckpt_path=a", "input=x", "output=y", "batch_size=0"], "batch_size='0'"),
        (["ckpt_path=a", "input=x", "output=y", "device=tpu"], "device='tpu'"),
        (["ckpt_path=/nowhere.ckpt", "input=x", "output=y"], "/nowhere.ckpt"),
        (["ckpt_path=a", "input=x", "output=y", "heatmaps=maybe"], "heatmaps='maybe'"),
        pytest.param(
            ["ckpt_path=/nowhere.ckpt", "input=x", "output=y", "device=cuda"],
            "device=cuda but PyTorch sees no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here"),
        ),
    ],
)
def test_bad_arguments_are_one_line(arguments, message, capsys):
    assert main(arguments) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0]
