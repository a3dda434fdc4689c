"""The run folder: one run's settings, checkpoints, logs and results, never another's.

A training run writes `config_resolved.yaml` (its settings) first and `metrics.json` (its test
results) last. A rerun into the same folder is checked against them before anything is written:
the same settings of an unfinished run resume it (a requeued or interrupted job), while a
finished run or other settings are refused, so no rerun rewrites another run's config, history
or results.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from anomaly.errors import RunFolderError
from anomaly.files import atomic_path

log = logging.getLogger(__name__)

SETTINGS_FILE = "config_resolved.yaml"
RESULTS_FILE = "metrics.json"
# Settings that may change between a run and its resumption: where it starts from and where
# the machine keeps its files.
RESUMABLE_KEYS = ("ckpt_path", "paths")


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """Nested dicts as `{"a.b.c": value}`."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def changed_settings(saved: dict, current: dict) -> list[str]:
    """`key: saved -> current` for every setting that differs, resumable keys left out."""
    old, new = flatten(saved), flatten(current)
    changes = []
    for key in sorted(old.keys() | new.keys()):
        if key.split(".")[0] in RESUMABLE_KEYS:
            continue
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            changes.append(f"{key}: {old.get(key, '<unset>')} -> {new.get(key, '<unset>')}")
    return changes


def check_writable(folder: Path) -> None:
    """Create `folder` and a file in it, or raise RunFolderError saying it cannot be written.

    Trying is the only reliable test: permissions do not stop root, a read-only mount does.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise RunFolderError(
            f"{folder}: output folder cannot be written ({error.strerror}); choose a writable "
            "one with hydra.run.dir=... (hydra.sweep.dir=... for -m)"
        ) from None


def claim_for_training(cfg: DictConfig) -> None:
    """Check that a training run may write into its folder (`cfg.paths.output_dir`).

    Raises:
        RunFolderError: the folder holds a finished run, a run with other settings, settings
            that cannot be read, or it cannot be written.
    """
    if rank_zero_only.rank != 0:  # the other ranks of a DDP run follow rank 0's folder
        return
    folder = Path(cfg.paths.output_dir)
    elsewhere = "choose another folder (hydra.run.dir=...) or delete this one"
    if (folder / RESULTS_FILE).exists():
        raise RunFolderError(f"{folder}: holds a finished run ({RESULTS_FILE}); {elsewhere}")
    settings = folder / SETTINGS_FILE
    if settings.is_file():
        try:
            saved = yaml.safe_load(settings.read_text())
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as error:
            reason = " ".join(str(error).split())
            raise RunFolderError(
                f"{settings}: unreadable run settings ({reason}); {elsewhere}"
            ) from None
        current = OmegaConf.to_container(cfg, resolve=True)
        changes = changed_settings(saved if isinstance(saved, dict) else {}, current)
        if changes:
            more = f" and {len(changes) - 1} more" if len(changes) > 1 else ""
            raise RunFolderError(
                f"{folder}: holds a run with other settings ({changes[0]}{more}); {elsewhere} "
                "(ckpt_path=<its checkpoints/last.ckpt> starts from its weights)"
            )
        log.info("%s: the same settings as the run in this folder: continuing it", folder)
    check_writable(folder)


def claim_for_evaluation(folder: str | Path) -> None:
    """Check that an evaluation may write its results into `folder`.

    Raises:
        RunFolderError: the folder already holds a run's results or settings, or cannot be
            written.
    """
    if rank_zero_only.rank != 0:
        return
    folder = Path(folder)
    for name in (RESULTS_FILE, SETTINGS_FILE):
        if (folder / name).exists():
            raise RunFolderError(
                f"{folder}: holds another run ({name}); write the evaluation elsewhere with "
                "hydra.run.dir=..."
            )
    check_writable(folder)


@rank_zero_only
def save_run_settings(cfg: DictConfig) -> None:
    """Write the run's settings once the folder is claimed: `config_resolved.yaml` (resolved)
    and Hydra's `.hydra/` (config with interpolations, hydra.yaml, overrides.yaml).

    Hydra itself is told not to write `.hydra/` (`hydra.output_subdir: null`), because it would
    do so before the folder is checked, over the settings of the run already there.
    """
    folder = Path(cfg.paths.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / SETTINGS_FILE) as temporary:
        OmegaConf.save(cfg, temporary, resolve=True)
    if not HydraConfig.initialized():
        return
    hydra_folder = folder / ".hydra"
    hydra_folder.mkdir(exist_ok=True)
    full = HydraConfig.instance().cfg
    files = {"config.yaml": cfg, "hydra.yaml": full, "overrides.yaml": full.hydra.overrides.task}
    for name, content in files.items():
        with atomic_path(hydra_folder / name) as temporary:
            OmegaConf.save(content, temporary)
