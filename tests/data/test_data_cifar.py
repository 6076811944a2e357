"""cenet.data.cifar: reading each CIFAR-10 format into uint8 tensors, and the decode cache."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cenet.data.cifar as cifar
from cenet.data.cache import cache_path, file_fingerprint
from cenet.data.cifar import (
    CIFAR10_CLASSES,
    load_cifar10,
    read_jpeg_archive,
    read_jpeg_folder,
    read_python_release,
)
from cenet.data.locate import DataSource, identify_data

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def test_class_order_is_cifar10s():
    assert CIFAR10_CLASSES == CLASSES
    assert list(CIFAR10_CLASSES) == sorted(CIFAR10_CLASSES)


def test_jpeg_archive_pixels_and_labels(jpeg_tar, helpers):
    s = read_jpeg_archive(jpeg_tar.path)
    assert s.classes == CLASSES
    assert s.train_images.shape == (20, 3, 32, 32) and s.train_images.dtype == torch.uint8
    assert s.test_images.shape == (10, 3, 32, 32)
    assert s.train_images.is_contiguous() and s.test_images.is_contiguous()
    assert s.train_labels.dtype == torch.int64
    assert s.train_labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert s.test_labels.tolist() == list(range(10))
    for split, images, labels, per in (
        ("train", s.train_images, s.train_labels, 2),
        ("test", s.test_images, s.test_labels, 1),
    ):
        for k in range(len(labels)):
            want = torch.tensor(helpers.color(split, int(labels[k]), k % per)).view(3, 1, 1)
            diff = (images[k].int() - want).abs().max().item()
            assert diff <= 3, (split, k, diff)


def test_jpeg_archive_with_prefix_and_val_split(tmp_path):
    path = tmp_path / "other.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for split, name, rgb in (
            ("train", "b", (0, 0, 250)),
            ("train", "a", (250, 0, 0)),
            ("val", "a", (0, 250, 0)),
            ("train", "README", None),
        ):
            data = b"text" if rgb is None else _jpeg(rgb)
            info = tarfile.TarInfo(f"./myset/{split}/{name}/0.jpg" if rgb else "myset/README")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    s = read_jpeg_archive(path)
    assert s.classes == ("a", "b")
    assert s.train_labels.tolist() == [0, 1]
    assert s.train_images[0, 0, 0, 0] > 240 and s.train_images[1, 2, 0, 0] > 240
    assert s.test_labels.tolist() == [0] and s.test_images[0, 1, 5, 5] > 240


def test_jpeg_images_of_different_sizes_raise(tmp_path):
    path = tmp_path / "mixed.tar"
    with tarfile.open(path, "w") as tf:
        for i, size in enumerate((32, 16)):
            data = _jpeg((1, 2, 3), size)
            info = tarfile.TarInfo(f"train/a/{i}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="one size"):
        read_jpeg_archive(path)


def test_python_release_exact_pixels_and_chw_layout(python_tar):
    s = read_python_release(python_tar.path)
    rows = python_tar.train_rows
    assert s.classes == CLASSES
    assert s.train_images.shape == (20, 3, 32, 32) and s.train_images.dtype == torch.uint8
    assert s.train_images.is_contiguous()
    assert torch.equal(s.train_images, torch.from_numpy(rows.reshape(-1, 3, 32, 32)))
    assert torch.equal(s.test_images, torch.from_numpy(python_tar.test_rows.reshape(-1, 3, 32, 32)))
    assert s.train_labels.tolist() == python_tar.train_labels.tolist()
    assert s.test_labels.tolist() == python_tar.test_labels.tolist()
    # official row = 1024 bytes R, then G, then B, each 32x32 row-major
    n, c, y, x = 7, 2, 5, 30
    assert s.train_images[n, c, y, x].item() == rows[n, c * 1024 + y * 32 + x]
    assert s.train_images[3, 0, 31, 0].item() == rows[3, 31 * 32]


def test_python_release_extracted_dir_equals_tar(python_tar, python_dir):
    a = read_python_release(python_tar.path)
    for path in (python_dir.path, python_dir.path / "cifar-10-batches-py"):
        b = read_python_release(path)
        assert torch.equal(a.train_images, b.train_images)
        assert torch.equal(a.test_labels, b.test_labels)


def test_python_release_errors(tmp_path, helpers):
    made = helpers.python_release_files()
    files = dict(made["files"])
    del files["data_batch_3"]
    helpers.write_python_tar(tmp_path / "missing.tar.gz", files)
    with pytest.raises(ValueError, match="lacks data_batch_3"):
        read_python_release(tmp_path / "missing.tar.gz")

    files = dict(made["files"])
    files["batches.meta"] = pickle.dumps({b"label_names": [b"x"] * 10}, protocol=2)
    helpers.write_python_tar(tmp_path / "meta.tar.gz", files)
    with pytest.raises(ValueError, match="not CIFAR-10's"):
        read_python_release(tmp_path / "meta.tar.gz")

    files = dict(made["files"])
    files["test_batch"] = pickle.dumps({b"data": os.system, b"labels": []})
    helpers.write_python_tar(tmp_path / "evil.tar.gz", files)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        read_python_release(tmp_path / "evil.tar.gz")


def test_load_cifar10_every_source_kind(jpeg_tar, python_tar, python_dir, tmp_path):
    extracted = tmp_path / "jpeg-tree"
    with tarfile.open(jpeg_tar.path) as tf:
        tf.extractall(extracted, filter="data")
    from_tar = load_cifar10(identify_data(jpeg_tar.path))
    from_tree = load_cifar10(identify_data(extracted))
    assert torch.equal(from_tar.train_images, from_tree.train_images)  # same JPEG bytes
    assert torch.equal(from_tar.test_labels, from_tree.test_labels)
    assert torch.equal(read_jpeg_folder(extracted).train_images, from_tar.train_images)
    a = load_cifar10(identify_data(python_tar.path))
    b = load_cifar10(identify_data(python_dir.path))
    assert torch.equal(a.train_images, b.train_images)


def test_non_cifar_classes_raise(tmp_path, helpers):
    path = helpers.write_jpeg_tar(tmp_path / "c9.tar.gz", classes=CLASSES[:9]).path
    with pytest.raises(ValueError, match="not CIFAR-10's"):
        load_cifar10(DataSource("jpeg_tar", path))


def test_cache_second_load_does_not_decode(jpeg_tar, tmp_path, monkeypatch):
    cache = tmp_path / "cache"  # $CENET_CACHE (conftest)
    first = load_cifar10(DataSource("jpeg_tar", jpeg_tar.path))
    file = cache_path(cache, "cifar10-jpeg", file_fingerprint(jpeg_tar.path))
    assert file.is_file()
    assert [p.name for p in cache.iterdir()] == [file.name]  # no temp files left behind
    saved = torch.load(file, weights_only=True)
    assert torch.equal(saved["train_images"], first.train_images)
    assert saved["classes"] == list(CLASSES)

    def boom(data):
        raise AssertionError("decoded although the cache holds the tensors")

    monkeypatch.setattr(cifar, "decode_image", boom)
    second = load_cifar10(DataSource("jpeg_tar", jpeg_tar.path))
    assert torch.equal(second.train_images, first.train_images)
    assert torch.equal(second.train_labels, first.train_labels)

    # a changed archive (new mtime) is a cache miss and gets decoded again
    st = jpeg_tar.path.stat()
    os.utime(jpeg_tar.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoded although"):
        load_cifar10(DataSource("jpeg_tar", jpeg_tar.path))


def test_corrupt_cache_file_is_rebuilt(jpeg_tar, tmp_path):
    cache = tmp_path / "elsewhere"
    file = cache_path(cache, "cifar10-jpeg", file_fingerprint(jpeg_tar.path))
    file.parent.mkdir()
    file.write_bytes(b"truncated garbage")
    s = load_cifar10(DataSource("jpeg_tar", jpeg_tar.path), cache_dir=cache)
    assert s.train_images.shape == (20, 3, 32, 32)
    assert torch.load(file, weights_only=True)["train_images"].shape == (20, 3, 32, 32)


REAL = Path("/work/shared/data/cifar10-jpeg.tar.gz")


@pytest.mark.slow
@pytest.mark.skipif(not REAL.is_file(), reason=f"{REAL} not present")
def test_real_cifar10_jpeg_archive(tmp_path, monkeypatch):
    source = identify_data(REAL)
    assert source == DataSource("jpeg_tar", REAL)
    s = load_cifar10(source, cache_dir=tmp_path / "real-cache")
    assert s.train_images.shape == (50_000, 3, 32, 32) and s.train_images.dtype == torch.uint8
    assert s.test_images.shape == (10_000, 3, 32, 32)
    assert torch.bincount(s.train_labels, minlength=10).tolist() == [5000] * 10
    assert torch.bincount(s.test_labels, minlength=10).tolist() == [1000] * 10
    # CIFAR-10's published channel means (from the lossless release); the JPEG copy decodes
    # to within 1.6e-4 of them
    mean = s.train_images.float().mean(dim=(0, 2, 3)) / 255
    torch.testing.assert_close(mean, torch.tensor([0.4914, 0.4822, 0.4465]), rtol=0, atol=5e-4)
    # the second load comes from the decode cache: nothing is decoded again
    monkeypatch.setattr(cifar, "decode_image", lambda *a, **k: pytest.fail("decoded again"))
    again = load_cifar10(source, cache_dir=tmp_path / "real-cache")
    assert torch.equal(again.test_images, s.test_images)
    assert torch.equal(again.train_labels, s.train_labels)


def _jpeg(rgb, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="JPEG", quality=100)
    return buf.getvalue()


def test_jpeg_helper_roundtrip():
    arr = cifar.decode_image(_jpeg((10, 100, 200)))
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
    assert np.abs(arr.astype(int) - [10, 100, 200]).max() <= 3
