"""Checkpoints load as weights only: a file that would run code is refused and runs nothing."""

from __future__ import annotations

import pickletools
import zipfile
from pathlib import Path

import pytest
import torch

from anomaly.checkpoints import read_checkpoint, resume_path
from anomaly.errors import CheckpointError
from tests.test_train import run


class WritesMarker:
    """Unpickling this calls open(marker, "w"): the file appears if the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def pickled_globals(path: Path) -> set[tuple[str, str]]:
    """The (module, name) globals the pickle inside a torch checkpoint refers to, read with
    pickletools (nothing is unpickled)."""
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        data = archive.read(name)
    found, strings = set(), []
    for opcode, argument, _ in pickletools.genops(data):
        if opcode.name == "GLOBAL":
            found.add(tuple(argument.split(" ", 1)))
        elif opcode.name == "STACK_GLOBAL":
            found.add((strings[-2], strings[-1]))
        if isinstance(argument, str):
            strings.append(argument)
    return found


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint that looks like the project's but runs code when fully unpickled."""
    config = {"model": {"name": "sdc_ccm"}, "data": {}, "seed": 0}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": config, "state_dict": {}, "payload": WritesMarker(marker)}, path)
    return path


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(CheckpointError, match="refused: loading it would run code"):
        read_checkpoint(path)
    assert not marker.exists()
    # The file really would run code: its pickle calls a global function (read, never run).
    assert pickled_globals(path) & {("io", "open"), ("builtins", "open")}


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", b"not a checkpoint"])
def test_unreadable_files_are_one_line_errors(tmp_path, content):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable checkpoint") as error:
        read_checkpoint(path)
    assert "\n" not in str(error.value)


def test_resuming_another_models_checkpoint_is_refused(tmp_path):
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"config": {"model": {"name": "residual_ae"}}}, path)
    with pytest.raises(CheckpointError, match="model 'residual_ae', cannot resume it as"):
        resume_path(None, str(tmp_path / "run"), "sdc_ccm")
    assert resume_path(None, str(tmp_path / "run"), "residual_ae") == str(path)
    assert resume_path(None, str(tmp_path / "empty"), "sdc_ccm") is None


def one_line_error(done) -> str:
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    return done.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_eval_and_train_refuse_a_crafted_checkpoint_in_one_line(tmp_path):
    marker = tmp_path / "pwned"
    evil = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    done = run("eval.py", f"ckpt_path={evil}", f"hydra.run.dir={tmp_path / 'eval'}")
    assert "refused" in one_line_error(done)
    done = run("train.py", f"ckpt_path={evil}", f"hydra.run.dir={tmp_path / 'train'}")
    assert "refused" in one_line_error(done)
    # A crafted last.ckpt in the run folder, which a rerun there would resume from.
    job = tmp_path / "job"
    crafted_checkpoint(job / "checkpoints" / "last.ckpt", marker)
    done = run("train.py", f"hydra.run.dir={job}")
    assert "refused" in one_line_error(done)
    assert not marker.exists() and not (job / "config_resolved.yaml").exists()


def test_a_truncated_last_checkpoint_stops_a_rerun_before_training(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04")
    with pytest.raises(
        CheckpointError, match="last.ckpt: not a readable checkpoint .*delete the file to start"
    ):
        resume_path(None, str(tmp_path), "sdc_ccm")
