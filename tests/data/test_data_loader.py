"""cenet.data.loader.TensorLoader: batching, determinism per (seed, epoch), resume."""

from __future__ import annotations

import pytest
import torch

from cenet.data.augment import normalize
from cenet.data.loader import Loader, TensorLoader


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.arange(50, dtype=torch.int64)  # label = index, to track samples
    return images, labels


def _collect(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_len_and_batch_shapes(data):
    keep = TensorLoader(*data, batch_size=16)
    drop = TensorLoader(*data, batch_size=16, drop_last=True)
    assert len(keep) == 4 and len(drop) == 3
    sizes = [y.numel() for _, y in keep]
    assert sizes == [16, 16, 16, 2]
    assert [y.numel() for _, y in drop] == [16, 16, 16]
    x, y = next(iter(keep))
    assert x.shape == (16, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert isinstance(keep, Loader) and keep.batch_size == 16 and keep.num_samples == 50


def test_eval_order_and_values(data):
    images, labels = data
    batches = _collect(TensorLoader(images, labels, batch_size=20))
    assert torch.equal(torch.cat([y for _, y in batches]), labels)
    assert torch.equal(torch.cat([x for x, _ in batches]), normalize(images))


def test_shuffle_covers_each_sample_once(data):
    loader = TensorLoader(*data, batch_size=16, shuffle=True, augment=True)
    seen = torch.cat([y for _, y in loader])
    assert sorted(seen.tolist()) == list(range(50))
    assert seen.tolist() != list(range(50))


def test_set_epoch_is_a_pure_function_of_seed_and_epoch(data):
    a = TensorLoader(*data, batch_size=16, shuffle=True, augment=True, seed=5)
    b = TensorLoader(*data, batch_size=16, shuffle=True, augment=True, seed=5)
    a.set_epoch(3)
    first = _collect(a)
    a.set_epoch(4)
    other = _collect(a)
    b.set_epoch(3)
    again = _collect(b)
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not all(torch.equal(y1, y2) for (_, y1), (_, y2) in zip(first, other, strict=True))
    c = TensorLoader(*data, batch_size=16, shuffle=True, augment=True, seed=6)
    c.set_epoch(3)
    assert not torch.equal(_collect(c)[0][1], first[0][1])


def test_augmentation_without_shuffle_differs_by_epoch(data):
    loader = TensorLoader(*data, batch_size=50, augment=True)
    loader.set_epoch(0)
    ((x0, y0),) = _collect(loader)
    loader.set_epoch(1)
    ((x1, y1),) = _collect(loader)
    assert torch.equal(y0, y1) and not torch.equal(x0, x1)


def test_resume_mid_epoch_gives_the_remaining_batches(data):
    loader = TensorLoader(*data, batch_size=16, shuffle=True, augment=True, seed=1)
    loader.set_epoch(2)
    full = _collect(loader)
    loader.set_epoch(2, start_batch=2)
    tail = _collect(loader)
    assert len(tail) == len(full) - 2
    for (x1, y1), (x2, y2) in zip(full[2:], tail, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_channels_last_output(data):
    loader = TensorLoader(*data, batch_size=8, channels_last=True)
    x, _ = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_bad_arguments(data):
    images, labels = data
    with pytest.raises(ValueError, match="batch_size"):
        TensorLoader(images, labels, batch_size=0)
    with pytest.raises(ValueError, match="uint8"):
        TensorLoader(images.float(), labels, batch_size=4)
    with pytest.raises(ValueError, match="int64"):
        TensorLoader(images, labels[:10], batch_size=4)
    loader = TensorLoader(images, labels, batch_size=4)
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(0, start_batch=99)
    with pytest.raises(ValueError, match="epoch"):
        loader.set_epoch(-1)
