"""MVTec-layout loader, dataset check, samplers and the DataModule."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from anomaly.data.images import load_image, load_mask
from anomaly.data.mvtec import MVTecDataset, check_category, list_samples
from anomaly.data.samplers import EpochSampler, ShardSampler
from anomaly.data.textures import TextureSource, check_textures
from anomaly.errors import ConfigError, DatasetError
from tests.conftest import SHARED_DTD, SHARED_MVTEC, make_datamodule, write_tree


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
        ("scratch/000_mask.png", "expected 0 for normal pixels"),
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
    datamodule = make_datamodule(tiny_tree, val_corrupted_copies=2)
    train_paths = {str(r.path) for r in datamodule.train_set.images.records}
    val_paths = {str(r.path) for r in datamodule.val_set.images.records}
    test_paths = {str(r.path) for r in datamodule.test_set.records}
    assert len(train_paths) == 9 and len(val_paths) == 3
    assert not train_paths & val_paths and not (train_paths | val_paths) & test_paths
    val = [datamodule.val_set[i] for i in range(len(datamodule.val_set))]
    assert sorted(s["label"] for s in val) == [0] * 3 + [1] * 6
    for sample in val:
        assert (sample["mask"].sum() > 0) == (sample["label"] == 1)
    # Each normal's copies are different corruptions of the same image.
    first = [s["mask"] for s in val if s["path"].startswith(val[0]["path"] + "#")]
    assert len(first) == 2 and not torch.equal(first[0], first[1])
    # Fixed: a second DataModule with the same seed builds the same validation set.
    again = make_datamodule(tiny_tree, val_corrupted_copies=2).val_set
    assert all(torch.equal(val[i]["image"], again[i]["image"]) for i in range(len(val)))


def write_object_category(root: Path, count: int = 12) -> np.ndarray:
    """Normal images of a dark square on a plain light backdrop; returns the square's 32 px mask."""
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = np.full((64, 64, 3), 200, np.int16) + rng.integers(-3, 4, (64, 64, 3))
        pixels[8:28, 36:56] = 60
        path = root / "widget" / "train" / "good" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(path)
    write_tree(root, num_train=0)
    square = np.zeros((32, 32), bool)
    square[4:14, 18:28] = True
    return square


@pytest.mark.parametrize("on_object", [True, False])
def test_validation_anomalies_fall_on_the_object(tmp_path, on_object):
    square = write_object_category(tmp_path)
    datamodule = make_datamodule(
        tmp_path, val_corrupted_copies=8, val_anomalies_on_object=on_object
    )
    near = cv2.dilate(square.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    val = datamodule.val_set
    masks = [val[i]["mask"][0].numpy() > 0 for i in range(len(val.images), len(val))]
    off_object = sum(bool((mask & ~near).any()) for mask in masks)
    assert len(masks) == 24 and all(mask.any() for mask in masks)
    assert (off_object == 0) if on_object else (off_object > len(masks) // 2)


@pytest.mark.parametrize(
    "setting",
    [
        {"val_fraction": 1.0},
        {"val_corrupted_copies": 0},
        {"val_corrupted_copies": "x"},
        {"val_anomalies_on_object": "yes"},
    ],
)
def test_datamodule_refuses_a_bad_validation_setting(tiny_tree, setting):
    (key,) = setting
    with pytest.raises(ConfigError, match=f"data.{key} must"):
        make_datamodule(tiny_tree, **setting)


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


def test_training_levels_are_the_mean_level_and_spread_of_the_training_images(tiny_tree):
    # At the images' own size (52 x 40) nothing is resized: the files' levels are the reference.
    datamodule = make_datamodule(tiny_tree, image_size=[52, 40])
    levels = [
        np.asarray(Image.open(record.path), dtype=np.float64) / 255.0
        for record in datamodule.train_set.images.records
    ]
    expected = (np.mean([x.mean() for x in levels]), np.mean([x.std() for x in levels]))
    assert datamodule.training_levels() == pytest.approx(expected, rel=1e-9)


def test_without_corruption_input_is_the_clean_image(tiny_tree):
    sample = make_datamodule(tiny_tree, corruption={"prob": 0.0}).train_set[0]
    assert torch.equal(sample["input"], sample["image"]) and sample["mask"].sum() == 0


def test_dataset_problem_stops_setup_with_one_line(tiny_tree):
    (tiny_tree / "widget" / "test" / "dent" / "001.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="dent/001.png") as error:
        make_datamodule(tiny_tree)
    assert "\n" not in str(error.value)


# --- 16-bit and float images -----------------------------------------------------------------

# A 16-bit gradient over the full range (H, W) = (8, 64), and its expected 8-bit values.
GRADIENT_16 = np.linspace(0, 65535, 8 * 64).round().astype(np.uint16).reshape(8, 64)
GRADIENT_8 = np.rint(GRADIENT_16 * 255.0 / 65535.0)


def assert_close_to(pixels: np.ndarray, expected: np.ndarray) -> None:
    assert pixels.dtype == np.uint8 and pixels.shape == expected.shape
    assert np.abs(pixels.astype(np.int64) - expected).max() <= 1


def test_16bit_grayscale_png_is_scaled_not_white(tmp_path):
    path = tmp_path / "gray16.png"
    Image.fromarray(GRADIENT_16).save(path)
    assert Image.open(path).mode == "I;16"
    assert_close_to(load_image(path, (8, 64)), np.repeat(GRADIENT_8[..., None], 3, axis=2))


def test_16bit_rgb_png_from_cv2_is_scaled(tmp_path):
    path = tmp_path / "rgb16.png"
    rgb = np.stack([GRADIENT_16, 65535 - GRADIENT_16, GRADIENT_16 // 3], axis=-1)
    assert cv2.imwrite(str(path), rgb[..., ::-1])  # cv2 writes BGR
    expected = np.stack([GRADIENT_8, 255 - GRADIENT_8, np.rint(rgb[..., 2] / 65535 * 255)], -1)
    assert_close_to(load_image(path, (8, 64)), expected)


def test_32bit_integer_and_float_images_are_scaled(tmp_path):
    Image.fromarray(GRADIENT_16.astype(np.int32), "I").save(tmp_path / "int32.tif")
    Image.fromarray((GRADIENT_16 / 65535).astype(np.float32), "F").save(tmp_path / "float.tif")
    for name in ("int32.tif", "float.tif"):
        assert_close_to(load_image(tmp_path / name, (8, 64))[..., 0], GRADIENT_8)


@pytest.mark.parametrize(
    ("pixels", "mode", "words"),
    [
        (np.array([[0, 70000]], np.int32), "I", r"values in \[0, 70000\]; expected 16-bit"),
        (np.array([[0.0, 2.5]], np.float32), "F", r"values in \[0, 2.5\]; expected values in"),
        (np.array([[0.0, np.nan]], np.float32), "F", "NaN or infinite"),
    ],
)
def test_out_of_range_deep_images_are_refused(tmp_path, pixels, mode, words):
    path = tmp_path / "deep.tif"
    Image.fromarray(pixels, mode).save(path)
    with pytest.raises(DatasetError, match=f"deep.tif: .*{words}"):
        load_image(path, (1, 2))


def write_16bit_tree(root: Path) -> Path:
    """A `write_tree` category whose images and masks are re-saved as 16-bit grayscale PNGs."""
    base = write_tree(root, num_train=4, num_good=1, defects={"dent": 1}, mode="L")
    for path in base.rglob("*.png"):
        pixels = np.asarray(Image.open(path)).astype(np.uint16) * 257  # 8 -> 16 bit, exactly
        Image.fromarray(pixels).save(path)
    return base


def test_check_accepts_16bit_images_and_reports_their_mode(tmp_path):
    write_16bit_tree(tmp_path)
    report = check_category(tmp_path, "widget")
    assert report["problems"] == []
    assert report["image_modes"] == {"I;16": 6} and report["num_masks"] == 1


def test_16bit_images_load_with_their_8bit_values(tmp_path):
    base = write_16bit_tree(tmp_path)
    path = base / "test" / "dent" / "000.png"
    expected = np.asarray(Image.open(path)) // 257  # the 8-bit values the tree was made from
    sample = MVTecDataset(list_samples(tmp_path, "widget", "test"), image_size=(52, 40))[0]
    assert sample["path"] == str(path)
    assert torch.equal(sample["image"][0], torch.from_numpy(expected / 255.0).float())
    assert sample["mask"].sum() == 13 * 10  # the square of `write_tree`, 16-bit {0, 65535}


# --- masks -----------------------------------------------------------------------------------


def save_mask(path: Path, values: np.ndarray) -> None:
    Image.fromarray(values).save(path)


@pytest.mark.parametrize(
    "level", [np.uint8(1), np.uint8(100), np.uint8(128), np.uint8(255), np.uint16(1)]
)
def test_two_level_mask_is_defect_where_it_is_not_zero(tmp_path, level):
    values = np.zeros((6, 8), dtype=level.dtype)
    values[1:3, 2:7] = level
    save_mask(tmp_path / "m.png", values)
    assert np.array_equal(load_mask(tmp_path / "m.png", (6, 8)), (values > 0).astype(np.uint8))


@pytest.mark.parametrize("level", [1, 100, 128])
def test_check_accepts_any_two_level_mask(tiny_tree, level):
    for path in (tiny_tree / "widget" / "ground_truth").rglob("*_mask.png"):
        values = np.asarray(Image.open(path))
        save_mask(path, np.where(values > 0, level, 0).astype(np.uint8))
    assert problems_of(tiny_tree) == []


def test_check_lists_the_values_of_a_many_valued_mask(tiny_tree):
    path = tiny_tree / "widget" / "ground_truth" / "dent" / "001_mask.png"
    values = np.zeros((52, 40), dtype=np.uint8)
    values[0:5], values[5:10], values[10:15] = 50, 128, 255
    save_mask(path, values)
    expected = (
        f"{path}: mask has 4 distinct values (0, 50, 128, 255); "
        "expected 0 for normal pixels and one value for defect pixels"
    )
    problems = problems_of(tiny_tree)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_check_shortens_a_long_list_of_mask_values(tiny_tree):
    path = tiny_tree / "widget" / "ground_truth" / "dent" / "001_mask.png"
    save_mask(path, np.arange(52 * 40).reshape(52, 40).astype(np.uint8))  # 256 values
    (problem,) = problems_of(tiny_tree)
    assert "mask has 256 distinct values (0, 1, 2, 3, 4, 5, ...)" in problem


def test_check_reports_an_empty_mask(tiny_tree):
    path = tiny_tree / "widget" / "ground_truth" / "scratch" / "001_mask.png"
    save_mask(path, np.zeros((52, 40), dtype=np.uint8))
    (problem,) = problems_of(tiny_tree)
    assert problem.startswith(f"{path}: mask is empty") and "no defect pixel" in problem


def test_check_reports_masks_without_images(tiny_tree):
    truth = tiny_tree / "widget" / "ground_truth"
    (tiny_tree / "widget" / "test" / "dent" / "001.png").unlink()
    (truth / "dent" / "000_mask.png").rename(truth / "dent" / "000.png")  # misnamed
    (truth / "crack").mkdir()
    (truth / "dent" / "001_mask.png").rename(truth / "crack" / "000_mask.png")
    problems = problems_of(tiny_tree)
    test_dir = tiny_tree / "widget" / "test"
    expected = [
        f"{test_dir / 'dent' / '000.png'}: ground-truth mask "
        f"{truth / 'dent' / '000_mask.png'} is missing",
        f"{truth / 'crack'}: ground-truth folder without a test folder; "
        f"expected {test_dir / 'crack'}",
        f"{truth / 'dent' / '000.png'}: mask without image; expected {test_dir / 'dent'}/<id>.",
    ]
    assert len(problems) == len(expected), problems
    for line in expected:
        assert any(p.startswith(line) for p in problems), (line, problems)


def test_check_reports_a_stray_mask_of_a_removed_image(tiny_tree):
    (tiny_tree / "widget" / "test" / "scratch" / "001.png").unlink()
    mask = tiny_tree / "widget" / "ground_truth" / "scratch" / "001_mask.png"
    expected = f"{mask}: mask without image; expected "
    expected += f"{tiny_tree / 'widget' / 'test' / 'scratch' / '001'}.<suffix>"
    assert [p.split(" (")[0] for p in problems_of(tiny_tree)] == [expected]


# --- textures --------------------------------------------------------------------------------


def write_dtd(root: Path, bad: bool = True) -> Path:
    """A tiny DTD tree: two good JPGs and, when `bad`, a text file and a truncated JPG."""
    rng = np.random.default_rng(5)
    for category in ("banded", "dotted"):
        (root / "images" / category).mkdir(parents=True)
        pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / category / f"{category}_0001.jpg")
    if bad:
        (root / "images" / "banded" / "notes.jpg").write_text("not an image")
        data = (root / "images" / "dotted" / "dotted_0001.jpg").read_bytes()
        (root / "images" / "dotted" / "cut.jpg").write_bytes(data[: len(data) // 2])
    return root


def test_check_textures_names_each_bad_file(tmp_path):
    dtd = write_dtd(tmp_path / "dtd")
    problems = check_textures(dtd)
    assert len(problems) == 2, problems
    assert problems[0].startswith(f"{dtd / 'images' / 'banded' / 'notes.jpg'}: unreadable")
    assert problems[1].startswith(f"{dtd / 'images' / 'dotted' / 'cut.jpg'}: unreadable")
    assert check_textures(write_dtd(tmp_path / "clean", bad=False)) == []
    (problem,) = check_textures(tmp_path / "nowhere")
    assert "does not exist" in problem


def test_texture_source_names_a_file_that_does_not_decode(tmp_path):
    (tmp_path / "images" / "banded").mkdir(parents=True)
    (tmp_path / "images" / "banded" / "notes.jpg").write_text("not an image")
    with pytest.raises(DatasetError, match="banded/notes.jpg: unreadable"):
        TextureSource(tmp_path).sample(np.random.default_rng(0), 8, 8)


def test_bad_texture_stops_setup_with_one_line(tiny_tree, tmp_path):
    dtd = write_dtd(tmp_path / "dtd")
    with pytest.raises(DatasetError, match=r"notes.jpg: .*\(and 1 more problems\)") as error:
        make_datamodule(tiny_tree, dtd_root=str(dtd))
    assert "\n" not in str(error.value) and f"dtd_root={dtd}`" in str(error.value)
    make_datamodule(tiny_tree, dtd_root=str(write_dtd(tmp_path / "clean", bad=False)))


def test_check_command_reports_textures(tiny_tree, tmp_path):
    dtd = write_dtd(tmp_path / "dtd")
    command = [sys.executable, "-m", "anomaly.data", f"root={tiny_tree}", "category=widget"]
    command.append(f"dtd_root={dtd}")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    report = json.loads(done.stdout)
    assert done.returncode == 1 and (report["dtd_root"], report["num_textures"]) == (str(dtd), 4)
    assert list(report)[-1] == "problems" and len(report["problems"]) == 2
    assert all("dtd/images/" in p for p in report["problems"])


@pytest.mark.skipif(not (SHARED_DTD / "images").is_dir(), reason="shared DTD data absent")
def test_real_dtd_textures_all_decode():
    assert check_textures(SHARED_DTD) == []


def test_validation_holds_out_enough_normals_for_the_statistics(tmp_path, caplog):
    write_tree(tmp_path, num_train=12)
    with caplog.at_level("WARNING"):
        datamodule = make_datamodule(tmp_path, val_fraction=0.1)  # 0.1 x 12 rounds to 1
    assert len(datamodule.val_set.images) == 3 and len(datamodule.train_set) == 9
    assert "holding out 3 of 12 normal images" in caplog.text
    write_tree(tmp_path / "few", num_train=3)
    with pytest.raises(DatasetError, match="3 normal images are too few; validation holds out"):
        make_datamodule(tmp_path / "few", val_fraction=0.1)
