"""The single-process CIFAR-10 loaders give, bit for bit, what they gave before distributed
sharding was added (digests recorded with that implementation): the main job's runs and
their checkpoints depend on the exact order, crops, flips and normalization."""

from __future__ import annotations

import hashlib

import pytest
import torch

from cenet.data import build_loaders
from cenet.data.loader import TensorLoader


def _digest(batches) -> str:
    """sha256 (first 32 hex digits) over every batch's shape, float32 bytes and labels."""
    h = hashlib.sha256()
    for x, y in batches:
        h.update(str(tuple(x.shape)).encode())
        h.update(x.contiguous().numpy().tobytes())
        h.update(y.numpy().tobytes())
    return h.hexdigest()[:32]


@pytest.fixture
def release(tmp_path, helpers):
    path = tmp_path / "release" / "cifar-10-python.tar.gz"
    path.parent.mkdir()
    helpers.write_python_tar(path, helpers.python_release_files()["files"])
    return path


def test_cifar10_loaders_unchanged(release):
    train, test, _ = build_loaders(data=release, batch_size=6, eval_batch_size=4, seed=3)
    train.set_epoch(0)
    batches = list(train)
    assert torch.cat([y for _, y in batches]).tolist() == [
        1, 8, 3, 1, 9, 8, 3, 3, 4, 5, 7, 9, 0, 3, 9, 2, 2, 9
    ]  # fmt: skip
    assert _digest(batches) == "56205a571864fac52c842eda2d02cb56"
    train.set_epoch(2, start_batch=1)
    assert _digest(train) == "8862f89afc45f592e5cf82bf0b9c3269"
    assert _digest(test) == "9e6765b0d1a6ff81d7435570744c0110"


def test_cifar10_partial_batch_unchanged(release):
    train, _, _ = build_loaders(data=release, batch_size=32, seed=1)  # 20 images < 32
    train.set_epoch(1)
    assert _digest(train) == "fda148586893fc157140b5ebe4d32fc5"


def test_tensor_loader_keep_last_unchanged():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8, generator=g)
    loader = TensorLoader(
        images, torch.arange(50), batch_size=16, shuffle=True, augment=True, seed=7
    )
    loader.set_epoch(5)
    assert _digest(loader) == "ea12ec0e1f5dba72641acd53b36bcbb9"
