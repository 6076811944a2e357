"""Where data is found.

Search order of :func:`find_data`:

1. the explicit ``data`` argument (``--data PATH``): a file (``cifar10-jpeg.tar.gz``,
   ``cifar-10-python.tar.gz``) or a directory holding one of those, an extracted
   ``cifar-10-batches-py/``, or an ImageFolder tree with ``train/`` and ``val/`` or ``test/``;
   a path that does not exist or holds no such data raises at once;
2. the environment variable ``CENET_DATA`` (same forms);
3. ``shared/data`` next to the checkout: for every parent of the current directory and of this
   package's directory, ``<parent>/shared/data`` (e.g. ``/work/main/src/cenet/data`` finds
   ``/work/shared/data``);
4. an earlier download in ``<cache>/cifar10`` (``$CENET_CACHE``, default ``~/.cache/cenet``);
5. a download of the official release with ``torchvision.datasets.CIFAR10`` into that folder.

If all fail, a :class:`FileNotFoundError` lists every place looked at and how to fix it.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from .cache import default_cache_dir

log = logging.getLogger(__name__)

ENV_DATA = "CENET_DATA"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
JPEG_ARCHIVE_NAME = "cifar10-jpeg.tar.gz"
PYTHON_ARCHIVE_NAME = "cifar-10-python.tar.gz"
PYTHON_DIR_NAME = "cifar-10-batches-py"
PYTHON_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
PYTHON_FILES = (*PYTHON_BATCHES, "test_batch", "batches.meta")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
TRAIN_SPLIT = "train"
EVAL_SPLITS = ("val", "test")  # the first one present is the evaluation split
DATASETS = ("cifar10", "folder")

SourceKind = Literal["jpeg_tar", "python_tar", "python_dir", "image_folder"]

_EXPECTED = {
    "cifar10": (
        f"{JPEG_ARCHIVE_NAME}, {PYTHON_ARCHIVE_NAME}, a directory holding one of them or an "
        f"extracted {PYTHON_DIR_NAME}/, or an ImageFolder directory with train/ and val/ or test/"
    ),
    "folder": "an ImageFolder directory with train/<class>/<image> and val/ or test/ beside it",
}


@dataclass(frozen=True)
class DataSource:
    """A located data set.

    Attributes:
        kind: ``"jpeg_tar"`` (tar of ``train|test/<class>/<image>``), ``"python_tar"``
            (``cifar-10-python.tar.gz``), ``"python_dir"`` (an extracted
            ``cifar-10-batches-py/``) or ``"image_folder"`` (a directory with ``train/`` and
            ``val/`` or ``test/``).
        path: the archive file or the directory itself (for ``python_dir``, the directory that
            holds ``data_batch_1``).
    """

    kind: SourceKind
    path: Path


def identify_data(path: str | os.PathLike[str], *, dataset: str = "cifar10") -> DataSource | None:
    """What ``path`` holds, or ``None`` if it holds nothing usable for ``dataset``.

    For ``dataset="folder"`` only an ImageFolder directory qualifies. A tar file not named
    ``cifar10-jpeg.tar.gz``/``cifar-10-python.tar.gz`` is recognised by its first members.
    A directory is checked in this order: it is ``cifar-10-batches-py`` itself, it holds
    ``cifar-10-batches-py/``, ``cifar-10-python.tar.gz``, ``cifar10-jpeg.tar.gz``, or it has
    ``train/`` and ``val/`` or ``test/``.

    Raises:
        ValueError: for an unknown ``dataset``.
    """
    _check_dataset(dataset)
    p = Path(path)
    if p.is_dir():
        if dataset == "cifar10":
            for candidate in (p, p / PYTHON_DIR_NAME):
                if _is_python_dir(candidate):
                    return DataSource("python_dir", candidate)
            for name in (PYTHON_ARCHIVE_NAME, JPEG_ARCHIVE_NAME):
                if (p / name).is_file():
                    return identify_data(p / name, dataset=dataset)
        if (p / TRAIN_SPLIT).is_dir() and any((p / s).is_dir() for s in EVAL_SPLITS):
            return DataSource("image_folder", p)
        return None
    if p.is_file() and dataset == "cifar10":
        if p.name == PYTHON_ARCHIVE_NAME:
            return DataSource("python_tar", p)
        if p.name == JPEG_ARCHIVE_NAME:
            return DataSource("jpeg_tar", p)
        kind = _peek_tar(p)
        return DataSource(kind, p) if kind is not None else None
    return None


def find_data(
    data: str | os.PathLike[str] | None = None,
    *,
    dataset: str = "cifar10",
    download: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    search_from: Sequence[str | os.PathLike[str]] | None = None,
) -> DataSource:
    """Locate ``dataset`` (see the module docstring for the search order).

    Args:
        data: explicit file or directory (``--data``); ``None`` or ``""`` searches.
        dataset: ``"cifar10"`` or ``"folder"`` (an ImageFolder tree; never downloaded).
        download: allow step 5 (downloading CIFAR-10, ~163 MB, into ``<cache_dir>/cifar10``).
        cache_dir: cache root; ``None`` means ``$CENET_CACHE`` or ``~/.cache/cenet``.
        search_from: starting directories for the ``shared/data`` walk; default: the current
            working directory and this file's directory.

    Returns:
        The first :class:`DataSource` found.

    Raises:
        FileNotFoundError: if ``data`` does not exist or holds no usable data (at once, no
            fallback), or if nothing was found anywhere; the message names every place that
            was looked at (paths, ``$CENET_DATA``, the download URL and folder) and the fix.
        ValueError: for an unknown ``dataset``.
    """
    _check_dataset(dataset)
    expected = _EXPECTED[dataset]
    if data is not None and str(data) != "":
        p = Path(data).expanduser()
        if not p.exists():
            raise FileNotFoundError(
                f"data path {str(p)!r} (--data) does not exist; expected {expected}"
            )
        found = identify_data(p, dataset=dataset)
        if found is None:
            raise FileNotFoundError(
                f"data path {str(p)!r} (--data) holds no {dataset} data; expected {expected}"
            )
        return found

    looked: list[str] = ["--data / data=: not given"]

    env = os.environ.get(ENV_DATA, "")
    if env:
        p = Path(env).expanduser()
        found = identify_data(p, dataset=dataset) if p.exists() else None
        if found is not None:
            return found
        why = "does not exist" if not p.exists() else f"holds no {dataset} data"
        log.warning("ignoring $%s=%s: it %s", ENV_DATA, env, why)
        looked.append(f"${ENV_DATA}={env}: {why}")
    else:
        looked.append(f"${ENV_DATA}: unset")

    starts = [Path.cwd(), Path(__file__).resolve().parent] if search_from is None else search_from
    notes = []
    for candidate in shared_data_candidates(starts):
        if candidate.is_dir():
            found = identify_data(candidate, dataset=dataset)
            if found is not None:
                return found
            notes.append(f"{candidate} (exists, no {dataset} data in it)")
        else:
            notes.append(f"{candidate} (missing)")
    looked.append("shared/data next to the checkout: " + ", ".join(notes))

    if dataset == "folder":
        looked.append("download: not available for dataset='folder'")
        raise FileNotFoundError(_not_found_message(dataset, looked))

    target = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "cifar10"
    found = identify_data(target, dataset=dataset) if target.is_dir() else None
    if found is not None:
        return found
    looked.append(f"earlier download in {target}: none")

    if not download:
        looked.append(f"download of {CIFAR10_URL} into {target}: disabled (download=False)")
        raise FileNotFoundError(_not_found_message(dataset, looked))
    log.info("downloading CIFAR-10 from %s into %s", CIFAR10_URL, target)
    try:
        download_cifar10(target)
    except Exception as exc:  # offline: URLError, timeouts, checksum errors, ...
        looked.append(
            f"download of {CIFAR10_URL} into {target}: failed ({type(exc).__name__}: {exc})"
        )
        raise FileNotFoundError(_not_found_message(dataset, looked)) from exc
    found = identify_data(target, dataset=dataset)
    if found is None:
        looked.append(f"download into {target}: finished but left no {PYTHON_DIR_NAME}/ there")
        raise FileNotFoundError(_not_found_message(dataset, looked))
    return found


def find_data_root(
    data: str | os.PathLike[str] | None = None,
    *,
    dataset: str = "cifar10",
    download: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """The path (archive file or directory) of :func:`find_data`; same arguments and errors."""
    return find_data(data, dataset=dataset, download=download, cache_dir=cache_dir).path


def shared_data_candidates(starts: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """``<d>/shared/data`` for each start directory ``d`` and all its parents, without repeats,
    in order (nearest first)."""
    out: list[Path] = []
    for start in starts:
        s = Path(start).resolve()
        for parent in (s, *s.parents):
            candidate = parent / "shared" / "data"
            if candidate not in out:
                out.append(candidate)
    return out


def download_cifar10(root: Path) -> None:
    """Download and extract the official CIFAR-10 python release into ``root`` with torchvision.

    Raises:
        Exception: whatever torchvision raises (``urllib.error.URLError`` when offline).
    """
    from torchvision.datasets import CIFAR10

    root.mkdir(parents=True, exist_ok=True)
    CIFAR10(root=str(root), train=True, download=True)


def _not_found_message(dataset: str, looked: list[str]) -> str:
    lines = [f"no {dataset} data found; looked at, in order:"]
    lines += [f"  {i}. {item}" for i, item in enumerate(looked, 1)]
    lines.append(
        f"Fix: pass --data PATH (data=PATH) or set {ENV_DATA}=PATH, where PATH is "
        f"{_EXPECTED[dataset]}."
    )
    return "\n".join(lines)


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")


def _is_python_dir(p: Path) -> bool:
    return (p / "data_batch_1").is_file() and (p / "test_batch").is_file()


def _peek_tar(path: Path, max_members: int = 64) -> SourceKind | None:
    """Classify a tar archive by its first members without reading it all."""
    try:
        with tarfile.open(path, "r|*") as tf:
            for i, member in enumerate(tf):
                parts = PurePosixPath(member.name).parts
                if not parts:
                    continue
                if PYTHON_DIR_NAME in parts or parts[-1] in PYTHON_FILES:
                    return "python_tar"
                if (
                    member.isfile()
                    and len(parts) >= 3
                    and parts[-3] in (TRAIN_SPLIT, *EVAL_SPLITS)
                    and parts[-1].lower().endswith(IMAGE_EXTENSIONS)
                ):
                    return "jpeg_tar"
                if i + 1 >= max_members:
                    break
    except (tarfile.TarError, OSError, EOFError):
        return None
    return None
