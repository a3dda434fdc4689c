"""MVTec-layout loader, dataset check, samplers and the DataModule."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly.data.mvtec import MVTecDataset, check_category, list_samples
from anomaly.data.samplers import EpochSampler, ShardSampler
from anomaly.errors import DatasetError
from tests.conftest import SHARED_MVTEC, make_datamodule, write_tree


def problems_of(root: Path, category: str = "widget") -> list[str]:
    return check_category(root, category)["problems"]


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_loader_gives_three_channel_resized_samples(tmp_path, mode):
    write_tree(tmp_path, size=(37, 53), mode=mode)
    records = list_samples(tmp_path, "widget", "test")
    dataset = MVTecDataset(records, image_size=32)
    labels = {s["defect_type"]: s["label"] for s in dataset}
    assert labels == {"good": 0, "scratch": 1, "dent": 1}
    for sample in dataset:
        assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
        assert sample["image"].min() >= 0.0 and sample["image"].max() <= 1.0
        assert sample["mask"].shape == (1, 32, 32)
        assert set(sample["mask"].unique().tolist()) <= {0.0, 1.0}
        assert (sample["mask"].sum() > 0) == (sample["label"] == 1)
        assert Path(sample["path"]).is_file()
    if mode == "L":  # grayscale is repeated, not colourized
        image = dataset[0]["image"]
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_masks_resize_without_blurring(tmp_path):
    write_tree(tmp_path, size=(64, 64), num_good=0, defects={"dent": 1})
    sample = MVTecDataset(list_samples(tmp_path, "widget", "test"), image_size=(24, 40))[0]
    assert sample["image"].shape == (3, 24, 40)
    # The 16..32 square of the 64 px mask becomes exactly the 6..12 x 10..20 block.
    expected = torch.zeros(24, 40)
    expected[6:12, 10:20] = 1
    assert torch.equal(sample["mask"][0], expected)


def test_check_reports_a_clean_tree(tiny_tree):
    report = check_category(tiny_tree, "widget")
    assert report["problems"] == []
    assert report["counts"] == {"train": {"good": 12}, "test": {"dent": 2, "good": 3, "scratch": 2}}
    assert (report["num_train"], report["num_test"], report["num_masks"]) == (12, 7, 4)
    assert report["image_sizes"] == {"40x52": 19} and report["image_modes"] == {"RGB": 19}


def test_check_names_every_problem(tiny_tree):
    base = tiny_tree / "widget"
    (base / "ground_truth" / "dent" / "000_mask.png").unlink()  # missing mask
    Image.new("L", (10, 10)).save(base / "ground_truth" / "dent" / "001_mask.png")  # wrong size
    gray = np.full((52, 40), 128, dtype=np.uint8)
    Image.fromarray(gray).save(base / "ground_truth" / "scratch" / "000_mask.png")  # not binary
    (base / "train" / "good" / "000.png").write_bytes(b"")  # zero bytes
    data = (base / "train" / "good" / "001.png").read_bytes()
    (base / "train" / "good" / "001.png").write_bytes(data[: len(data) // 2])  # truncated
    (base / "train" / "good" / "002.png").write_bytes(b"not an image at all")  # unreadable
    problems = problems_of(tiny_tree)
    expected = [
        ("dent/000.png", "mask"),
        ("001_mask.png", "10x10"),
        ("scratch/000_mask.png", "not binary"),
        ("good/000.png", "0 bytes"),
        ("good/001.png", "truncated"),
        ("good/002.png", "unreadable"),
    ]
    for name, words in expected:
        assert any(name in p and words in p for p in problems), (name, problems)
    assert len(problems) == len(expected)


def test_check_reports_empty_split_and_unknown_category(tiny_tree):
    for path in (tiny_tree / "widget" / "train" / "good").iterdir():
        path.unlink()
    assert any("train: split holds no images" in p for p in problems_of(tiny_tree))
    problems = problems_of(tiny_tree, "gadget")
    assert len(problems) == 1 and "does not exist" in problems[0] and "['widget']" in problems[0]


def test_check_command_prints_json_and_sets_exit_code(tiny_tree):
    command = [sys.executable, "-m", "anomaly.data", f"root={tiny_tree}", "category=widget"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0 and json.loads(done.stdout)["num_masks"] == 4
    (tiny_tree / "widget" / "test" / "dent" / "000.png").write_bytes(b"")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    report = json.loads(done.stdout)
    assert done.returncode == 1 and len(report["problems"]) == 1


@pytest.mark.skipif(not (SHARED_MVTEC / "capsule").is_dir(), reason="shared capsule data absent")
def test_real_capsule_category_is_complete():
    report = check_category(SHARED_MVTEC, "capsule")
    assert report["problems"] == []
    assert (report["num_train"], report["num_test"], report["num_masks"]) == (219, 132, 109)
    assert report["counts"]["test"]["good"] == 23


def test_epoch_sampler_is_seeded_per_epoch_and_shards_evenly():
    sampler = EpochSampler(10, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(10)) and first == list(EpochSampler(10, seed=3))
    sampler.set_epoch(2)
    second = list(sampler)
    assert sorted(second) == list(range(20, 30)) and [i - 20 for i in second] != first
    shards = [list(EpochSampler(10, 3, True, rank, 3)) for rank in range(3)]
    assert all(len(shard) == 4 for shard in shards)  # padded to equal length
    assert set().union(*shards) == set(range(10))


def test_shard_sampler_covers_each_index_exactly_once():
    shards = [list(ShardSampler(11, rank, 4)) for rank in range(4)]
    assert sorted(i for shard in shards for i in shard) == list(range(11))


def test_datamodule_splits_are_disjoint_and_val_has_both_classes(tiny_tree):
    datamodule = make_datamodule(tiny_tree)
    train_paths = {str(r.path) for r in datamodule.train_set.images.records}
    val_paths = {str(r.path) for r in datamodule.val_set.images.records}
    test_paths = {str(r.path) for r in datamodule.test_set.records}
    assert len(train_paths) == 9 and len(val_paths) == 3
    assert not train_paths & val_paths and not (train_paths | val_paths) & test_paths
    val = [datamodule.val_set[i] for i in range(len(datamodule.val_set))]
    assert sorted(s["label"] for s in val) == [0, 0, 0, 1, 1, 1]
    for sample in val:
        assert (sample["mask"].sum() > 0) == (sample["label"] == 1)
    # Fixed: a second DataModule with the same seed builds the same validation set.
    again = make_datamodule(tiny_tree).val_set
    assert all(torch.equal(val[i]["image"], again[i]["image"]) for i in range(len(val)))


def test_training_samples_are_corrupted_reproducibly(tiny_tree):
    train_set = make_datamodule(tiny_tree).train_set
    sample = train_set[5]
    assert set(sample) >= {"image", "input", "mask", "label", "defect_type", "path"}
    changed = (sample["input"] != sample["image"]).any(0)
    assert torch.equal(changed.float(), sample["mask"][0]) and changed.any()
    assert torch.equal(train_set[5]["input"], sample["input"])  # same (seed, epoch, index)
    next_epoch = train_set[5 + len(train_set)]  # same image, next epoch: new corruption
    assert torch.equal(next_epoch["image"], sample["image"])
    assert not torch.equal(next_epoch["input"], sample["input"])


def test_without_corruption_input_is_the_clean_image(tiny_tree):
    sample = make_datamodule(tiny_tree, corruption={"prob": 0.0}).train_set[0]
    assert torch.equal(sample["input"], sample["image"]) and sample["mask"].sum() == 0


def test_dataset_problem_stops_setup_with_one_line(tiny_tree):
    (tiny_tree / "widget" / "test" / "dent" / "001.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="dent/001.png") as error:
        make_datamodule(tiny_tree)
    assert "\n" not in str(error.value)
