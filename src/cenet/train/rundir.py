"""The run directory: where it is, refusing to clobber it, and what may change on resume."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cenet.train.checkpoint import remove_stale_temp_files
from cenet.train.config import SCHEMA, TrainConfig
from cenet.train.config_files import Config, dump_yaml, resume_config_of

RUN_FILES = ("config.yaml", "metrics.jsonl", "last.pt", "best.pt")
"""Files a run writes into its directory (removed by ``overwrite``)."""

RESUME_MUTABLE = frozenset(
    {
        "data",
        "threads",
        "device",
        "deterministic",
        "keep_freed_memory",
        "record_channels",
        "log_interval",
        "num_workers",
        "download",
        "eval_batch_size",
        "checkpoint_every_steps",
        "compile",
        "dist_backend",
        "skip_bad_images",
        "max_steps",
        "grad_accum_steps",
    }
)
"""Keys that may differ from the checkpoint's config on resume (they do not change what is
computed, or only where and how fast); every other key must stay as it was.

``max_steps`` may change so that a smoke-tested run can be continued. The number of processes
is not a config key: a run may resume on another number of processes ``W`` as long as the
global ``batch_size`` divides into ``W x grad_accum_steps`` micro-batches, and
``grad_accum_steps`` may change with it; keeping ``W x grad_accum_steps`` as it was keeps the
micro-batches (and so the batch statistics) exactly as in the uninterrupted run, otherwise a
warning says that they differ."""


def run_dir_of(cfg: TrainConfig) -> Path:
    """``cfg.out``, or ``runs/<model>_s<seed>`` when it is null."""
    return Path(cfg.out) if cfg.out else Path("runs") / f"{cfg.model}_s{cfg.seed}"


def check_new_run_dir(run_dir: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Check that a new run may use ``run_dir``, without touching the disk.

    Raises:
        FileExistsError: if ``run_dir`` is a file, or a non-empty directory and not
            ``overwrite``.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"run directory {run_dir} exists and is not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"run directory {run_dir} is not empty; continue it with --resume, start over "
            f"with --overwrite, or choose another --out"
        )
    return run_dir


def prepare_new_run_dir(run_dir: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Create ``run_dir`` for a new run (see :func:`check_new_run_dir`).

    Args:
        run_dir: the directory.
        overwrite: if it is not empty, delete the files of :data:`RUN_FILES` (others are kept)
            instead of raising.

    Raises:
        FileExistsError: if ``run_dir`` is a file, or a non-empty directory and not
            ``overwrite``.
    """
    run_dir = check_new_run_dir(run_dir, overwrite=overwrite)
    if run_dir.is_dir():
        for name in RUN_FILES:
            with contextlib.suppress(FileNotFoundError):
                (run_dir / name).unlink()
        remove_stale_temp_files(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def write_config(run_dir: str | os.PathLike[str], cfg: Config) -> Path:
    """Write ``cfg`` (a :class:`TrainConfig` or another config, e.g. a detection run's) as
    ``run_dir/config.yaml``, atomically; returns the path."""
    path = Path(run_dir) / "config.yaml"
    tmp = path.with_name(".config.yaml.tmp")
    tmp.write_text(dump_yaml(cfg), encoding="utf-8")
    os.replace(tmp, path)
    return path


def resume_checkpoint_path(resume: str | os.PathLike[str] | None, cfg: TrainConfig) -> Path:
    """The checkpoint to resume: ``resume`` (a file, or a run directory's ``last.pt``), or
    ``last.pt`` in the run directory of ``cfg`` when ``resume`` is None.

    Raises:
        FileNotFoundError: if that checkpoint does not exist.
    """
    path = Path(resume) if resume is not None else run_dir_of(cfg)
    if path.is_dir() or resume is None:
        path = path / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: checkpoint {path} does not exist")
    return path


def resume_config(
    stored: Mapping[str, Any], overrides: Mapping[str, Any], run_dir: str | os.PathLike[str]
) -> TrainConfig:
    """The config of a resumed run: the checkpoint's, with the ``overrides`` the user gave, and
    ``out`` set to ``run_dir`` (the folder of the checkpoint: a run continues where it is).

    Args:
        stored: the config dict saved in the checkpoint.
        overrides: values given again on resume (from ``--config``, ``--set``, flags).
        run_dir: the directory of the resumed checkpoint.

    Raises:
        ValueError: if an override changes a key outside :data:`RESUME_MUTABLE` (the total
            epochs, the schedule, the model ... are those of the checkpoint; start a new run to
            change them), names another ``out`` than ``run_dir``, or is invalid.
    """
    return resume_config_of(SCHEMA, stored, overrides, run_dir, mutable=RESUME_MUTABLE)
