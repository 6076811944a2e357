"""The decoded-tensor cache: ``$CENET_CACHE`` (default ``~/.cache/cenet``), one ``.pt`` file per
source, named by a fingerprint of that source, written atomically and read with
``torch.load(weights_only=True)``."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

ENV_CACHE = "CENET_CACHE"
CACHE_FORMAT = 1  # bump when the layout of cached files changes


def default_cache_dir() -> Path:
    """``$CENET_CACHE`` if set and non-empty, else ``~/.cache/cenet`` (not created here)."""
    env = os.environ.get(ENV_CACHE, "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cenet"


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """16 hex digits identifying a file by its resolved path, size in bytes and mtime (ns).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
    """
    p = Path(path).resolve()
    st = p.stat()
    return _digest(str(p), st.st_size, st.st_mtime_ns)


def tree_fingerprint(root: str | os.PathLike[str], splits: tuple[str, ...]) -> str:
    """16 hex digits identifying an ImageFolder tree without reading its images.

    Uses the resolved path plus, for every ``<split>/<class>/`` directory, its name, mtime (ns)
    and number of entries; adding, removing or renaming a file changes the directory's mtime
    and therefore the fingerprint. Editing a file in place does not: delete the cache file
    (see :func:`cache_path`) after doing that.
    """
    r = Path(root).resolve()
    parts: list[object] = [str(r)]
    for split in splits:
        for d in sorted((r / split).iterdir()):
            if d.is_dir():
                parts += [split, d.name, d.stat().st_mtime_ns, len(os.listdir(d))]
    return _digest(*parts)


def cache_path(cache_dir: str | os.PathLike[str], stem: str, fingerprint: str) -> Path:
    """Where the cache file for ``stem`` (e.g. ``"cifar10-jpeg"``) and ``fingerprint`` lives."""
    return Path(cache_dir) / f"{stem}-{fingerprint}.pt"


def load_or_build(
    cache_dir: str | os.PathLike[str] | None,
    stem: str,
    fingerprint: str,
    build: Callable[[], Mapping[str, Any]],
) -> dict[str, Any]:
    """Load a dict of tensors (and plain str/int/list values) from the cache, or build and save it.

    Args:
        cache_dir: cache directory; ``None`` means :func:`default_cache_dir`. Created if missing.
        stem: readable file-name prefix.
        fingerprint: identifies the source; a changed source gets a new file.
        build: called on a miss (or an unreadable cache file); returns the dict to cache.

    Returns:
        The dict, either loaded with ``torch.load(weights_only=True)`` or fresh from ``build``.
        A cache directory that cannot be written is logged as a warning, not raised.
    """
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_path(directory, stem, fingerprint)
    if path.is_file():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict) and obj.get("cache_format") == CACHE_FORMAT:
                log.debug("loaded %s", path)
                return obj
            log.warning("ignoring cache file %s: unexpected format", path)
        except Exception as exc:  # a truncated or foreign file: rebuild it
            log.warning("ignoring unreadable cache file %s (%s)", path, exc)
    obj = dict(build())
    obj["cache_format"] = CACHE_FORMAT
    try:
        atomic_save(obj, path)
        log.info("cached at %s", path)
    except OSError as exc:
        log.warning("could not write cache file %s (%s); continuing without a cache", path, exc)
    return obj


def atomic_save(obj: object, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file in the same directory, then ``os.replace`` it into place,
    so readers see either no file or a complete one.

    Raises:
        OSError: if the directory cannot be created or written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _digest(*parts: object) -> str:
    text = "\x1f".join(str(p) for p in parts)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
