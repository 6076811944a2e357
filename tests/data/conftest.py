"""Tiny data sets in every format cenet.data reads, built in tmp_path, and an isolated
environment: no $CENET_DATA, a private $CENET_CACHE, and no network downloads."""

from __future__ import annotations

import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cenet.data.locate as locate

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Every test: $CENET_DATA unset, $CENET_CACHE in tmp_path, downloads raise."""
    monkeypatch.delenv("CENET_DATA", raising=False)
    monkeypatch.setenv("CENET_CACHE", str(tmp_path / "cache"))

    def no_download(root):
        raise RuntimeError("downloads are disabled in the tests")

    monkeypatch.setattr(locate, "download_cifar10", no_download)


def color(split: str, label: int, i: int) -> tuple[int, int, int]:
    """A distinct solid RGB color for image i of class `label` in `split`."""
    s = 0 if split == "train" else 1
    return (20 + 21 * label, 30 + 60 * i + 100 * s, 240 - 19 * label)


def jpeg_bytes(rgb: tuple[int, int, int], size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="JPEG", quality=100, subsampling=0)
    return buf.getvalue()


@dataclass
class JpegData:
    path: Path
    n_train: int  # per class
    n_test: int  # per class


def write_jpeg_tar(path: Path, n_train: int = 2, n_test: int = 1, classes=CLASSES) -> JpegData:
    """A tar.gz like cifar10-jpeg.tar.gz: train|test/<class>/<NNNN>.jpg, solid colors.

    Members are added in reverse class order so that sorting, not tar order, fixes labels.
    """
    with tarfile.open(path, "w:gz") as tf:
        for split, n in (("train", n_train), ("test", n_test)):
            for label in reversed(range(len(classes))):
                for i in range(n):
                    data = jpeg_bytes(color(split, label, i))
                    info = tarfile.TarInfo(f"{split}/{classes[label]}/{i:04d}.jpg")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return JpegData(path, n_train, n_test)


@pytest.fixture
def jpeg_tar(tmp_path) -> JpegData:
    return write_jpeg_tar(tmp_path / "cifar10-jpeg.tar.gz")


@dataclass
class PythonRelease:
    path: Path  # cifar-10-python.tar.gz
    train_rows: np.ndarray  # uint8 [N, 3072], official row layout
    train_labels: np.ndarray
    test_rows: np.ndarray
    test_labels: np.ndarray


def python_release_files(per_batch: int = 4, n_test: int = 6, seed: int = 0) -> dict:
    """name -> pickled bytes of the official release (protocol 2, bytes keys, like the original)."""
    rng = np.random.default_rng(seed)
    files = {}
    rows, labels = [], []
    for b in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        rows.append(x)
        labels += y
        batch = {
            b"batch_label": f"training batch {b} of 5".encode(),
            b"labels": y,
            b"data": x,
            b"filenames": [f"img_{b}_{i}.png".encode() for i in range(per_batch)],
        }
        files[f"data_batch_{b}"] = pickle.dumps(batch, protocol=2)
    tx = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    ty = [int(v) for v in rng.integers(0, 10, n_test)]
    files["test_batch"] = pickle.dumps(
        {b"batch_label": b"testing batch 1 of 1", b"labels": ty, b"data": tx}, protocol=2
    )
    meta = {
        b"num_cases_per_batch": per_batch,
        b"label_names": [c.encode() for c in CLASSES],
        b"num_vis": 3072,
    }
    files["batches.meta"] = pickle.dumps(meta, protocol=2)
    expected = (np.concatenate(rows), np.array(labels), tx, np.array(ty))
    return {"files": files, "expected": expected}


def write_python_tar(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tf:
        d = tarfile.TarInfo("cifar-10-batches-py")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name, data in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def python_tar(tmp_path) -> PythonRelease:
    made = python_release_files()
    path = tmp_path / "release" / "cifar-10-python.tar.gz"
    path.parent.mkdir()
    write_python_tar(path, made["files"])
    return PythonRelease(path, *made["expected"])


@pytest.fixture
def python_dir(tmp_path) -> PythonRelease:
    """An extracted release: tmp/extracted/cifar-10-batches-py/<files>; path = tmp/extracted."""
    made = python_release_files()
    base = tmp_path / "extracted" / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for name, data in made["files"].items():
        (base / name).write_bytes(data)
    return PythonRelease(base.parent, *made["expected"])


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """An ImageFolder tree with RGB, grayscale ("L") and RGBA PNGs of several sizes.

    train/: cats 3 (RGB 40x30, L 48x48, RGBA 36x50), dogs 2 (L 64x40, RGBA 32x32);
    val/: cats 1 (L 50x50), dogs 1 (RGBA 45x45); test/: (ignored, val wins) dogs 1.
    """
    root = tmp_path / "pets"
    specs = {
        "train/cats": [("RGB", (40, 30)), ("L", (48, 48)), ("RGBA", (36, 50))],
        "train/dogs": [("L", (64, 40)), ("RGBA", (32, 32))],
        "val/cats": [("L", (50, 50))],
        "val/dogs": [("RGBA", (45, 45))],
        "test/dogs": [("RGB", (45, 45))],
    }
    for folder, images in specs.items():
        (root / folder).mkdir(parents=True)
        for i, (mode, size) in enumerate(images):
            fill = {"RGB": (200, 10, 10), "L": 128, "RGBA": (10, 200, 10, 255)}[mode]
            Image.new(mode, size, fill).save(root / folder / f"{i}.png")
    return root


@pytest.fixture
def helpers():
    """The builders above, for tests (a fixture, so no test imports conftest by name)."""
    import types

    return types.SimpleNamespace(
        CLASSES=CLASSES,
        color=color,
        jpeg_bytes=jpeg_bytes,
        write_jpeg_tar=write_jpeg_tar,
        write_python_tar=write_python_tar,
        python_release_files=python_release_files,
    )
