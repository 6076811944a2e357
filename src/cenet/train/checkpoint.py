"""Checkpoints: plain dicts of tensors and numbers, written atomically, loaded weights-only.

A checkpoint (``last.pt``, ``best.pt``) is a ``dict`` with the keys of :data:`REQUIRED_KEYS`:
the model, optimizer and scheduler ``state_dict``s, the position in training (``epoch``:
0-based epoch in progress; ``step``: batches of that epoch already done, 0 at an epoch
boundary; ``global_step``: iterations done in total), ``best_top1``, the config as a dict, the
torch RNG state, ``format_version`` and the running sums of the epoch in progress. It holds no
code: :func:`load_checkpoint` reads it with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import secrets
import zipfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
"""Version of the checkpoint layout; bumped when keys change meaning."""

REQUIRED_KEYS = (
    "format_version",
    "model",
    "optimizer",
    "scheduler",
    "epoch",
    "step",
    "global_step",
    "best_top1",
    "config",
    "rng_state",
)

_TMP_PREFIX = "."
_TMP_SUFFIX = ".tmp"


class CheckpointError(ValueError):
    """A file that is not a readable cenet checkpoint (garbage, wrong layout or version)."""


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj)`` to ``path`` so that ``path`` is either the old file or the new one.

    Writes to a temporary file in the same directory, flushes and fsyncs it, then
    ``os.replace``s it over ``path`` and fsyncs the directory. On any error the temporary file
    is removed and ``path`` is left untouched.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    unique = f"{os.getpid()}.{secrets.token_hex(4)}"
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{unique}{_TMP_SUFFIX}")
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def remove_stale_temp_files(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files left in ``run_dir`` by an :func:`atomic_save` that was killed.

    Returns:
        The removed paths.
    """
    removed = []
    for p in Path(run_dir).glob(f"{_TMP_PREFIX}*.pt.*{_TMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`atomic_save` with ``torch.load(weights_only=True)``.

    Args:
        path: the ``.pt`` file, or a run directory (its ``last.pt`` is read).
        map_location: device the tensors are loaded to.

    Raises:
        FileNotFoundError: if there is no such file (or no ``last.pt`` in the directory).
        CheckpointError: if the file is not a torch file, holds anything but plain data, is not
            a dict with the checkpoint keys, or has another ``format_version``.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "last.pt").is_file():
            raise FileNotFoundError(f"no checkpoint last.pt in run directory {path}")
        path = path / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint (corrupt, truncated or another format)"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} is refused by weights_only=True loading: it holds objects other than "
            f"tensors and plain data, so it is not a cenet checkpoint ({_unpickler_detail(err)})"
        ) from None
    except Exception as err:  # the weights-only unpickler fails in many ways on garbage
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint (corrupt or truncated?): "
            f"{_unpickler_detail(err)}"
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"{path} holds a {type(ckpt).__name__}, not a cenet checkpoint dict "
            f"(keys {', '.join(REQUIRED_KEYS)})"
        )
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a cenet checkpoint: missing keys {missing}")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format_version {ckpt['format_version']!r}; this cenet "
            f"reads version {FORMAT_VERSION}"
        )
    if not isinstance(ckpt["config"], dict) or not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path}: 'config' and 'model' must be dicts")
    return ckpt


def _unpickler_detail(err: BaseException) -> str:
    """The reason inside torch's long weights-only message (without its advice to load with
    ``weights_only=False``), or the first line of other errors."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split("Check the documentation", 1)[0]
        text = text.split("Please use `torch.serialization", 1)[0]
    text = " ".join(text.split())
    return text or type(err).__name__


def _fsync_dir(folder: Path) -> None:
    """fsync a directory so a rename in it is durable (a no-op where not supported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def peek_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The stored config of a checkpoint file (or of a run directory's ``last.pt``), read
    without loading its tensors into memory (``mmap``); ``{}`` if there is no readable
    checkpoint there. For decisions that must precede a full load (e.g. the device of a
    resumed distributed run); never raises."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        config = ckpt["config"]
    except Exception:  # anything unreadable simply means "unknown here"
        return {}
    return dict(config) if isinstance(config, dict) else {}


def load_states(ckpt: dict[str, Any], targets: dict[str, Any], *, what: str) -> None:
    """``target.load_state_dict(ckpt[key])`` for each ``key: target`` of ``targets`` in order
    (``None`` targets skipped), for resuming.

    Args:
        ckpt: the checkpoint.
        targets: checkpoint keys and the objects (model, optimizer, ...) their states go to.
        what: what the checkpoint must fit, for the message (e.g. ``"model 'resnet20'"``).

    Raises:
        CheckpointError: if a key is missing or a state does not fit.
    """
    try:
        for key, target in targets.items():
            if target is not None:
                target.load_state_dict(ckpt[key])
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(f"checkpoint does not fit {what}: {err}") from None
