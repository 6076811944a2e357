"""CIFAR-10 as in-memory uint8 tensors, from the JPEG archive, an extracted JPEG ImageFolder tree,
or the official python release (``cifar-10-python.tar.gz`` or ``cifar-10-batches-py/``).

JPEG sources are decoded once (PIL, converted to RGB) and the tensors cached (see
:mod:`cenet.data.cache`); the python release is already raw pixels and is read directly.
"""

from __future__ import annotations

import importlib
import io
import logging
import os
import pickle
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image

from .cache import file_fingerprint, load_or_build, tree_fingerprint
from .locate import (
    EVAL_SPLITS,
    IMAGE_EXTENSIONS,
    PYTHON_BATCHES,
    PYTHON_DIR_NAME,
    PYTHON_FILES,
    TRAIN_SPLIT,
    DataSource,
)

log = logging.getLogger(__name__)

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
"""CIFAR-10 class names in label order 0..9 (also their sorted order)."""


@dataclass(frozen=True)
class TensorSplits:
    """A decoded image-classification data set held in memory.

    Attributes:
        train_images: uint8 ``[N_train, 3, H, W]``, contiguous, RGB, values 0..255.
        train_labels: int64 ``[N_train]``, values in ``0..len(classes)-1``.
        test_images: uint8 ``[N_test, 3, H, W]``.
        test_labels: int64 ``[N_test]``.
        classes: class names; label ``i`` is ``classes[i]``.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """A dict of tensors and a list of names that ``torch.load(weights_only=True)`` reads."""
        return {
            "train_images": self.train_images,
            "train_labels": self.train_labels,
            "test_images": self.test_images,
            "test_labels": self.test_labels,
            "classes": list(self.classes),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSplits:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: if a tensor is missing or has the wrong dtype or rank.
        """
        out = cls(
            train_images=d["train_images"],
            train_labels=d["train_labels"],
            test_images=d["test_images"],
            test_labels=d["test_labels"],
            classes=tuple(d["classes"]),
        )
        out.validate()
        return out

    def validate(self) -> None:
        """Check dtypes, ranks, matching lengths and label range.

        Raises:
            ValueError: naming the first field that is wrong.
        """
        k = len(self.classes)
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            got = f"got {x.dtype} {tuple(x.shape)} and {y.dtype} {tuple(y.shape)}"
            if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
                raise ValueError(f"{split} images: expected uint8 [N,3,H,W]; {got}")
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise ValueError(f"{split} labels: expected int64 [N]; {got}")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
                raise ValueError(f"{split} labels outside 0..{k - 1}")


def load_cifar10(
    source: DataSource, *, cache_dir: str | os.PathLike[str] | None = None
) -> TensorSplits:
    """CIFAR-10 train and test tensors from any located source.

    Args:
        source: from :func:`cenet.data.locate.find_data`.
        cache_dir: cache for decoded JPEG sources; ``None`` means ``$CENET_CACHE`` or
            ``~/.cache/cenet``. Unused for the python release.

    Returns:
        :class:`TensorSplits` with images uint8 ``[N, 3, 32, 32]`` (50,000 train and 10,000 test
        for the full data set) and int64 labels in CIFAR-10 order (:data:`CIFAR10_CLASSES`).

    Raises:
        ValueError: if the classes are not exactly CIFAR-10's or images are not 3x32x32.
        FileNotFoundError: if the source vanished.
    """
    path = source.path
    if source.kind in ("python_tar", "python_dir"):
        splits = read_python_release(path)
    elif source.kind == "jpeg_tar":
        obj = load_or_build(
            cache_dir, "cifar10-jpeg", file_fingerprint(path), lambda: _decode_logged(path)
        )
        splits = TensorSplits.from_dict(obj)
    elif source.kind == "image_folder":
        fp = tree_fingerprint(path, (TRAIN_SPLIT, _eval_split(path)))
        obj = load_or_build(cache_dir, "cifar10-folder", fp, lambda: _decode_logged(path))
        splits = TensorSplits.from_dict(obj)
    else:
        raise ValueError(f"unknown data source kind {source.kind!r}")
    check_cifar10(splits, where=str(path))
    return splits


def check_cifar10(splits: TensorSplits, *, where: str = "data") -> None:
    """Check that ``splits`` has CIFAR-10's classes, in order, and 3x32x32 images.

    Raises:
        ValueError: naming what differs.
    """
    if splits.classes != CIFAR10_CLASSES:
        raise ValueError(
            f"{where}: classes {list(splits.classes)} are not CIFAR-10's "
            f"{list(CIFAR10_CLASSES)}; use dataset='folder' for other ImageFolder data"
        )
    for x in (splits.train_images, splits.test_images):
        if tuple(x.shape[1:]) != (3, 32, 32):
            raise ValueError(f"{where}: CIFAR-10 images must be 3x32x32, got {tuple(x.shape[1:])}")


def decode_image(data: bytes) -> np.ndarray:
    """Decode one encoded image (JPEG, PNG, ...) to RGB.

    Returns:
        uint8 array ``[H, W, 3]``; grayscale, palette and RGBA images are converted to RGB
        (alpha dropped).

    Raises:
        PIL.UnidentifiedImageError: if the bytes are not an image.
    """
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def read_jpeg_archive(path: str | os.PathLike[str]) -> TensorSplits:
    """Decode every image of a tar(.gz) laid out as ``[prefix/]train|val|test/<class>/<file>``.

    The archive is streamed once. Classes are the sorted class-folder names of ``train/``
    (label = index); the evaluation split is ``test/`` if present, else ``val/``. Images are
    ordered by (class, file name).

    Returns:
        :class:`TensorSplits` (uint8 ``[N, 3, H, W]``, int64 labels).

    Raises:
        ValueError: no ``train/`` or no evaluation images, evaluation classes missing from
            ``train/``, or images of different sizes.
    """

    def members() -> Iterator[tuple[str, str, str, bytes]]:
        with tarfile.open(path, "r|*") as tf:
            for m in tf:
                key = _split_class_file(m.name) if m.isfile() else None
                f = tf.extractfile(m) if key is not None else None
                if key is not None and f is not None:
                    yield (*key, f.read())

    return _assemble(members(), str(path))


def read_jpeg_folder(root: str | os.PathLike[str]) -> TensorSplits:
    """Like :func:`read_jpeg_archive`, for an extracted tree ``root/train|val|test/<class>/<file>``.

    Raises:
        ValueError: as :func:`read_jpeg_archive`, or if there is no ``val/`` or ``test/``.
    """
    r = Path(root)
    splits = (TRAIN_SPLIT, _eval_split(r))

    def members() -> Iterator[tuple[str, str, str, bytes]]:
        for split in splits:
            for class_dir in sorted(d for d in (r / split).iterdir() if d.is_dir()):
                for f in sorted(class_dir.iterdir()):
                    if f.is_file() and _is_image_name(f.name):
                        yield split, class_dir.name, f.name, f.read_bytes()

    return _assemble(members(), str(r))


def read_python_release(path: str | os.PathLike[str]) -> TensorSplits:
    """Read the official CIFAR-10 python release.

    Args:
        path: ``cifar-10-python.tar.gz`` (any tar), a ``cifar-10-batches-py/`` directory or a
            directory containing it. Needs ``data_batch_1..5`` and ``test_batch``;
            ``batches.meta`` is checked if present.

    Returns:
        :class:`TensorSplits`: rows of 3072 bytes (R plane, G plane, B plane, each 32x32
        row-major) reshaped to uint8 ``[N, 3, 32, 32]``; train = batches 1..5 in order.

    Raises:
        ValueError: a file is missing, malformed, or ``batches.meta`` names other classes.
        pickle.UnpicklingError: a pickle refers to anything but numpy arrays and plain data.
    """
    p = Path(path)
    raw: dict[str, bytes] = {}
    if p.is_dir():
        base = p if (p / "data_batch_1").is_file() else p / PYTHON_DIR_NAME
        raw = {n: (base / n).read_bytes() for n in PYTHON_FILES if (base / n).is_file()}
    else:
        with tarfile.open(p, "r|*") as tf:
            for m in tf:
                name = PurePosixPath(m.name).name
                f = tf.extractfile(m) if m.isfile() and name in PYTHON_FILES else None
                if f is not None:
                    raw[name] = f.read()
    missing = [n for n in (*PYTHON_BATCHES, "test_batch") if n not in raw]
    if missing:
        raise ValueError(f"{p}: CIFAR-10 python release lacks {', '.join(missing)}")
    classes = CIFAR10_CLASSES
    if "batches.meta" in raw:
        meta = _safe_unpickle(raw["batches.meta"])
        names = tuple(_text(n) for n in meta.get(b"label_names", []))
        if names != CIFAR10_CLASSES:
            raise ValueError(f"{p}: batches.meta names classes {list(names)}, not CIFAR-10's")
    train = [_read_batch(raw[n], f"{p}:{n}") for n in PYTHON_BATCHES]
    test_x, test_y = _read_batch(raw["test_batch"], f"{p}:test_batch")
    return TensorSplits(
        train_images=torch.cat([x for x, _ in train]),
        train_labels=torch.cat([y for _, y in train]),
        test_images=test_x,
        test_labels=test_y,
        classes=classes,
    )


# --- helpers ---------------------------------------------------------------------------------


def _decode_logged(path: Path) -> dict[str, Any]:
    log.info("decoding the JPEG images of %s once; later runs load the cached tensors", path)
    reader = read_jpeg_folder if path.is_dir() else read_jpeg_archive
    return reader(path).to_dict()


def _eval_split(root: Path) -> str:
    for s in EVAL_SPLITS:
        if (root / s).is_dir():
            return s
    raise ValueError(f"{root}: no {' or '.join(EVAL_SPLITS)} directory beside {TRAIN_SPLIT}/")


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _split_class_file(member: str) -> tuple[str, str, str] | None:
    parts = PurePosixPath(member).parts
    if len(parts) < 3 or parts[-3] not in (TRAIN_SPLIT, *EVAL_SPLITS):
        return None
    return (parts[-3], parts[-2], parts[-1]) if _is_image_name(parts[-1]) else None


def _assemble(members: Iterator[tuple[str, str, str, bytes]], where: str) -> TensorSplits:
    """Decode ``(split, class, file, bytes)`` records into sorted, stacked tensors."""
    from tqdm.auto import tqdm

    records: dict[str, list[tuple[str, str, np.ndarray]]] = {}
    shape: tuple[int, ...] | None = None
    for split, cls, name, data in tqdm(
        members, desc="decoding", unit="img", leave=False, disable=None, mininterval=1.0
    ):
        img = decode_image(data)
        if shape is None:
            shape = img.shape
        elif img.shape != shape:
            raise ValueError(
                f"{where}: {split}/{cls}/{name} is {img.shape[1]}x{img.shape[0]}, "
                f"others are {shape[1]}x{shape[0]}; all images must be one size"
            )
        records.setdefault(split, []).append((cls, name, img))
    eval_split = next((s for s in ("test", "val") if s in records), None)
    if TRAIN_SPLIT not in records or eval_split is None:
        raise ValueError(
            f"{where}: expected images under train/ and test/ (or val/), "
            f"found splits {sorted(records)}"
        )
    classes = tuple(sorted({c for c, _, _ in records[TRAIN_SPLIT]}))
    extra = sorted({c for c, _, _ in records[eval_split]} - set(classes))
    if extra:
        raise ValueError(f"{where}: {eval_split}/ has classes {extra} that train/ lacks")
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for split in (TRAIN_SPLIT, eval_split):
        recs = sorted(records[split], key=lambda r: (index[r[0]], r[1]))
        images = torch.from_numpy(np.stack([r[2] for r in recs])).permute(0, 3, 1, 2)
        labels = torch.tensor([index[r[0]] for r in recs], dtype=torch.int64)
        out[split] = (images.contiguous(), labels)
    return TensorSplits(*out[TRAIN_SPLIT], *out[eval_split], classes=classes)


def _read_batch(data: bytes, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    d = _safe_unpickle(data)
    x, y = d.get(b"data"), d.get(b"labels")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise ValueError(f"{where}: b'data' must be a uint8 array [N, 3072]")
    if y is None or len(y) != x.shape[0]:
        raise ValueError(f"{where}: b'labels' must list one label per row of b'data'")
    images = torch.from_numpy(x.reshape(-1, 3, 32, 32).copy())
    labels = torch.as_tensor(np.asarray(y, dtype=np.int64))
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(CIFAR10_CLASSES)):
        raise ValueError(f"{where}: labels outside 0..{len(CIFAR10_CLASSES) - 1}")
    return images, labels


def _text(s: bytes | str) -> str:
    return s.decode() if isinstance(s, bytes) else s


_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, nothing that could run other code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        if module.startswith("numpy.core"):  # numpy >= 2 moved it; avoid its deprecation shim
            try:
                return getattr(importlib.import_module("numpy._core" + module[10:]), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


def _safe_unpickle(data: bytes) -> dict:
    obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    if not isinstance(obj, dict):
        raise ValueError(f"expected a pickled dict, got {type(obj).__name__}")
    return obj
