"""Distributed sharding of both loaders: rank r of W yields positions r, r+W, ... of each
global batch (what DistributedSampler gives), equal lengths on every rank, mid-epoch resume on
each rank, and disjoint, covering evaluation shards without padding."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DistributedSampler

from cenet.data import build_loaders
from cenet.data.folder import FolderLoader, folder_transform, scan_image_folder
from cenet.data.loader import TensorLoader
from cenet.data.sharding import shard_positions
from cenet.data.synthetic import make_image_folder


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8, generator=g)
    return images, torch.arange(50)  # label = index, to track samples


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A JPEG ImageFolder: 3 classes x 7 train images (21), 3 x 3 val images (9), 20x16."""
    return make_image_folder(
        tmp_path_factory.mktemp("shards") / "jpegs",
        num_classes=3, train_per_class=7, val_per_class=3, size=(20, 16),
    )  # fmt: skip


def _epoch(loader, epoch, start_batch=0):
    loader.set_epoch(epoch, start_batch=start_batch)
    return [(x.clone(), y.clone()) for x, y in loader]


def _check_strided(single, ranks, world):
    """Rank r's batch k is positions r::W of the single-process batch k."""
    for r, batches in enumerate(ranks):
        assert len(batches) == len(single)
        for (x1, y1), (xr, yr) in zip(single, batches, strict=True):
            assert torch.equal(xr, x1[r::world]) and torch.equal(yr, y1[r::world])


def _tensor_loaders(tensors, batch, world, **kwargs):
    images, labels = tensors
    common = dict(shuffle=True, augment=True, seed=4, **kwargs)
    single = TensorLoader(images, labels, batch_size=batch, **common)
    ranks = [
        TensorLoader(images, labels, batch_size=batch // world, num_replicas=world, rank=r,
                     **common)
        for r in range(world)
    ]  # fmt: skip
    return single, ranks


@pytest.mark.parametrize("world", [2, 3, 4])
def test_tensor_loader_rank_batches_are_strided_parts_of_the_global_batch(tensors, world):
    single, ranks = _tensor_loaders(tensors, 12, world, drop_last=True)
    for epoch in (0, 3):
        expected = _epoch(single, epoch)
        _check_strided(expected, [_epoch(rank, epoch) for rank in ranks], world)
    assert {len(rank) for rank in ranks} == {len(single)} == {50 // 12}
    # what DDP with W ranks and no accumulation sees equals W=1 with W accumulation steps
    x1 = expected[1][0]
    for a in range(world):
        assert torch.equal(_epoch(ranks[a], 3)[1][0], x1[a::world])


@pytest.mark.parametrize("world", [2, 3])
def test_tensor_loader_resume_mid_epoch_on_every_rank(tensors, world):
    _, ranks = _tensor_loaders(tensors, 12, world, drop_last=True)
    for rank in ranks:
        full = _epoch(rank, 2)
        tail = _epoch(rank, 2, start_batch=2)
        assert len(tail) == len(full) - 2
        for (x1, y1), (x2, y2) in zip(full[2:], tail, strict=True):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_one_partial_global_batch_is_padded_like_distributed_sampler(tensors):
    """Fewer images than a global batch (no drop_last): the one batch is padded with the
    first positions so that every rank gets as many images."""
    images, labels = tensors[0][:7], tensors[1][:7]
    single, ranks = _tensor_loaders((images, labels), 12, 3, drop_last=False)
    ((x1, y1),) = _epoch(single, 1)
    padded_x, padded_y = torch.cat([x1, x1[:2]]), torch.cat([y1, y1[:2]])  # 7 -> 9 = 3 x 3
    for r, rank in enumerate(ranks):
        ((xr, yr),) = _epoch(rank, 1)
        assert torch.equal(xr, padded_x[r::3]) and torch.equal(yr, padded_y[r::3])


def test_shard_positions_match_distributed_sampler():
    for n in (1, 7, 12, 50):
        for world in (1, 2, 3, 5):
            for drop_last in (False, True):
                for r in range(world):
                    sampler = DistributedSampler(
                        range(n), num_replicas=world, rank=r, shuffle=False, drop_last=drop_last
                    )
                    got = shard_positions(n, world, r, drop_last=drop_last, even=True)
                    assert got.tolist() == list(sampler), (n, world, drop_last, r)
                assert shard_positions(n, world, 0, drop_last=drop_last, even=False).tolist() == (
                    list(range(0, n, world))
                )


def test_tensor_eval_shards_are_disjoint_and_cover_the_set(tensors):
    images, labels = tensors
    single = TensorLoader(images, labels, batch_size=8)
    whole = torch.cat([y for _, y in single])
    seen = []
    for r in range(3):
        rank = TensorLoader(images, labels, batch_size=4, num_replicas=3, rank=r,
                            even_shards=False)  # fmt: skip
        ys = torch.cat([y for _, y in rank])
        assert torch.equal(ys, whole[r::3])
        assert rank.num_samples == ys.numel() and rank.total_samples == 50
        seen.append(ys)
    assert sorted(torch.cat(seen).tolist()) == list(range(50))  # each image exactly once


def test_build_loaders_cifar_sharded(python_tar):
    train1, test1, info = build_loaders(data=python_tar.path, batch_size=6, eval_batch_size=4,
                                        seed=2)  # fmt: skip
    single = _epoch(train1, 1)
    ranks, eval_labels = [], []
    for r in range(2):
        train, test, info2 = build_loaders(
            data=python_tar.path, batch_size=6, eval_batch_size=4, seed=2, num_replicas=2, rank=r
        )
        assert info2 == info
        assert (train.batch_size, len(train), train.num_replicas, train.rank) == (3, 3, 2, r)
        assert train.total_samples == 20 and train.num_samples == 10
        assert test.batch_size == 2 and test.num_samples == 3 and test.total_samples == 6
        ranks.append(_epoch(train, 1))
        eval_labels.append(torch.cat([y for _, y in test]))
    _check_strided(single, ranks, 2)
    whole = torch.cat([y for _, y in test1])
    for r in range(2):
        assert torch.equal(eval_labels[r], whole[r::2])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_replicas": 0}, "num_replicas must be an integer >= 1"),
        ({"num_replicas": 2, "rank": 2}, r"rank must be an integer in 0\.\.1 \(num_replicas=2\)"),
        ({"rank": -1}, r"rank must be an integer in 0\.\.0"),
        ({"num_replicas": 3, "batch_size": 8},
         "batch_size=8 is not a multiple of num_replicas=3: .* use a multiple of 3 \\(e.g. 6\\)"),
        ({"skip_bad_images": "yes"}, "skip_bad_images must be True or False"),
    ],
)  # fmt: skip
def test_bad_shard_arguments(python_tar, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_loaders(data=python_tar.path, **kwargs)


def _folder_loaders(folder, batch, world, *, workers=0, drop_last=True, train=True):
    splits = scan_image_folder(folder)
    samples = splits.train if train else splits.test
    common = dict(
        transform=folder_transform(12, train=train), shuffle=train, random_transform=train,
        drop_last=drop_last, seed=5, num_workers=workers, even_shards=train,
    )  # fmt: skip
    single = FolderLoader(samples, batch_size=batch, **common)
    ranks = [
        FolderLoader(samples, batch_size=batch // world, num_replicas=world, rank=r, **common)
        for r in range(world)
    ]
    return single, ranks


@pytest.mark.parametrize("world", [2, 3])
def test_folder_loader_rank_batches_are_strided_parts_of_the_global_batch(folder, world):
    single, ranks = _folder_loaders(folder, 6, world)
    for epoch in (0, 1):
        _check_strided(_epoch(single, epoch), [_epoch(rank, epoch) for rank in ranks], world)
    assert {len(rank) for rank in ranks} == {len(single)} == {21 // 6}
    for rank in ranks:
        assert isinstance(rank.sampler, DistributedSampler)
        assert rank.num_samples == len(rank.sampler) == 21 // world
        assert rank.total_samples == 21


def test_folder_loader_resume_mid_epoch_on_every_rank(folder):
    _, ranks = _folder_loaders(folder, 4, 2, workers=1)
    for rank in ranks:
        full = _epoch(rank, 3)
        tail = _epoch(rank, 3, start_batch=3)
        assert len(full) == 21 // 4 and len(tail) == len(full) - 3
        for (x1, y1), (x2, y2) in zip(full[3:], tail, strict=True):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_folder_eval_shards_are_disjoint_and_cover_the_set(folder):
    single, ranks = _folder_loaders(folder, 4, 2, drop_last=False, train=False)
    whole = torch.cat([x for x, _ in _epoch(single, 0)])
    counts = []
    for r, rank in enumerate(ranks):
        xs = torch.cat([x for x, _ in _epoch(rank, 0)])
        assert torch.equal(xs, whole[r::2])  # no padding, no repeats
        assert rank.num_samples == xs.shape[0] and rank.total_samples == 9
        counts.append(xs.shape[0])
    assert counts == [5, 4] and [len(rank) for rank in ranks] == [3, 2]


def test_build_loaders_folder_sharded(folder):
    common = dict(dataset="folder", data=folder, batch_size=6, eval_batch_size=4,
                  image_size=12, seed=1)  # fmt: skip
    train1, test1, _ = build_loaders(**common)
    single, whole = _epoch(train1, 2), torch.cat([y for _, y in test1])
    ranks = []
    for r in range(3):
        train, test, _ = build_loaders(**common, num_replicas=3, rank=r)
        assert train.batch_size == 2 and len(train) == len(train1) == 3
        assert test.batch_size == 2 and test.num_samples == 3 and test.total_samples == 9
        ranks.append(_epoch(train, 2))
        assert torch.equal(torch.cat([y for _, y in test]), whole[r::3])
    _check_strided(single, ranks, 3)
