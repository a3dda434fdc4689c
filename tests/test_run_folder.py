"""Run folders and result files: reruns never overwrite another run, writes are atomic, and
file-system faults are one line."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from anomaly.errors import RunFolderError
from anomaly.files import atomic_path, write_text
from anomaly.loggers import ResumableCSVLogger
from anomaly.run_folder import (
    check_writable,
    claim_for_evaluation,
    claim_for_training,
    save_run_settings,
)
from anomaly.runtime import user_error_message

# A folder nobody can create, not even root: sysfs is read-only.
READ_ONLY = Path("/sys/anomaly-read-only-test")


def cannot_create(folder: Path) -> bool:
    try:
        folder.mkdir()
    except OSError:
        return True
    folder.rmdir()
    return False


def training_config(folder: Path, lr: float = 1e-3, **extra) -> DictConfig:
    return OmegaConf.create(
        {
            "seed": 0,
            "ckpt_path": None,
            "paths": {"output_dir": str(folder), "root_dir": "/somewhere"},
            "model": {"name": "sdc_ccm", "optimizer": {"lr": lr}},
            **extra,
        }
    )


def test_an_empty_or_new_folder_is_claimed_and_gets_the_settings(tmp_path):
    folder = tmp_path / "run"
    claim_for_training(training_config(folder))
    save_run_settings(training_config(folder))
    saved = yaml.safe_load((folder / "config_resolved.yaml").read_text())
    assert saved["model"]["optimizer"]["lr"] == 1e-3


def test_a_finished_run_is_never_rerun_over(tmp_path):
    save_run_settings(training_config(tmp_path))
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(RunFolderError, match=r"holds a finished run \(metrics.json\)"):
        claim_for_training(training_config(tmp_path))
    with pytest.raises(RunFolderError, match=r"holds another run \(metrics.json\)"):
        claim_for_evaluation(tmp_path)


def test_other_settings_are_refused_naming_the_first_change(tmp_path):
    save_run_settings(training_config(tmp_path))
    before = (tmp_path / "config_resolved.yaml").read_bytes()
    with pytest.raises(
        RunFolderError, match=r"other settings \(model.optimizer.lr: 0.001 -> 0.01 and 1 more\)"
    ):
        claim_for_training(training_config(tmp_path, lr=1e-2, test=False))
    assert (tmp_path / "config_resolved.yaml").read_bytes() == before


def test_the_same_settings_continue_the_run_whatever_the_paths_and_ckpt_path(tmp_path, caplog):
    save_run_settings(training_config(tmp_path))
    changed = training_config(tmp_path)
    changed.paths.root_dir = "/elsewhere"
    changed.ckpt_path = "some.ckpt"
    with caplog.at_level("INFO"):
        claim_for_training(changed)
    assert "continuing it" in caplog.text


def test_unreadable_settings_are_a_one_line_refusal(tmp_path):
    (tmp_path / "config_resolved.yaml").write_text("model: [unclosed\n")
    with pytest.raises(RunFolderError, match="config_resolved.yaml: unreadable run settings"):
        claim_for_training(training_config(tmp_path))
    with pytest.raises(RunFolderError, match=r"holds another run \(config_resolved.yaml\)"):
        claim_for_evaluation(tmp_path)


@pytest.mark.skipif(not cannot_create(READ_ONLY), reason="no read-only /sys here")
def test_a_folder_that_cannot_be_written_is_named(tmp_path):
    with pytest.raises(RunFolderError, match="anomaly-read-only-test: output folder cannot be"):
        check_writable(READ_ONLY)
    with pytest.raises(RunFolderError, match="cannot be written"):
        claim_for_training(training_config(READ_ONLY))


def test_an_atomic_write_that_fails_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "metrics.json"
    write_text(path, "old\n")
    disk_full = OSError(errno.ENOSPC, "No space left on device", str(path))
    with pytest.raises(OSError, match="No space left"), atomic_path(path) as temporary:
        temporary.write_text("half of the new")
        raise disk_full
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    write_text(path, "new\n")
    assert path.read_text() == "new\n" and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize(
    ("code", "reason"),
    [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")],
)
def test_file_system_faults_are_one_line_naming_the_file(code, reason):
    error = OSError(code, reason, "/runs/x/metrics.json")
    assert user_error_message(error) == f"/runs/x/metrics.json: {reason}"
    # A missing file is the program's business (or has its own check): it keeps its traceback.
    assert user_error_message(FileNotFoundError(errno.ENOENT, "No such file", "/x")) is None


def test_out_of_memory_says_which_settings_to_lower():
    message = user_error_message(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert message.startswith("out of memory; lower data.batch_size")


def test_the_csv_history_of_a_resumed_run_is_kept(tmp_path):
    first = ResumableCSVLogger(str(tmp_path), name="csv", version="")
    first.log_metrics({"train/loss": 1.0, "epoch": 0}, step=0)
    first.save()
    resumed = ResumableCSVLogger(str(tmp_path), name="csv", version="")
    resumed.log_metrics({"train/loss": 0.5, "epoch": 1}, step=1)
    resumed.log_metrics({"val/loss": 0.7, "epoch": 1}, step=1)  # a new column
    resumed.save()
    lines = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    assert lines[0] == "epoch,step,train/loss,val/loss"
    assert lines[1:] == ["0,0,1.0,", "1,1,0.5,", "1,1,,0.7"]
