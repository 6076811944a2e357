"""FolderLoader's one DataLoader: persistent worker processes reused across epochs, with the
epoch and resume point still applied, and the global RNG left alone."""

from __future__ import annotations

import os

import pytest
import torch

from cenet.data.folder import FolderLoader, folder_transform, scan_image_folder
from cenet.data.synthetic import make_image_folder


class PidImage:
    """A transform that ignores the image and returns float64 ``[1]`` holding the process id."""

    def __call__(self, image) -> torch.Tensor:
        return torch.tensor([float(os.getpid())], dtype=torch.float64)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = make_image_folder(
        tmp_path_factory.mktemp("workers") / "jpegs", num_classes=2, train_per_class=8, size=16
    )
    return scan_image_folder(root).train


def _epoch(loader, epoch, start_batch=0):
    loader.set_epoch(epoch, start_batch=start_batch)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_worker_processes_live_across_epochs(samples):
    loader = FolderLoader(samples, transform=PidImage(), batch_size=4, num_workers=2)
    pids = []
    for epoch in range(3):
        pids.append({int(v) for x, _ in _epoch(loader, epoch) for v in x.flatten().tolist()})
    assert len(pids[0]) == 2 and os.getpid() not in pids[0]
    assert pids[0] == pids[1] == pids[2]  # the same two processes every epoch
    assert loader.loader.persistent_workers


def test_epoch_and_resume_reach_persistent_workers(samples):
    def make(workers):
        return FolderLoader(
            samples, transform=folder_transform(12, train=True), batch_size=3, shuffle=True,
            random_transform=True, drop_last=True, seed=9, num_workers=workers,
        )  # fmt: skip

    reference, loader = make(0), make(2)
    for epoch, start in ((0, 0), (1, 0), (1, 2), (0, 4)):
        want = _epoch(reference, epoch, start)
        got = _epoch(loader, epoch, start)
        assert len(got) == len(want) == 16 // 3 - start
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                   for a, b in zip(want, got, strict=True))  # fmt: skip
    # an epoch left half-way (prefetched batches in flight) does not leak into the next one
    loader.set_epoch(2)
    it = iter(loader)
    next(it)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(_epoch(reference, 3), _epoch(loader, 3),
                                                       strict=True))  # fmt: skip


def test_iterating_leaves_the_global_rng_alone(samples):
    loader = FolderLoader(
        samples, transform=folder_transform(8, train=True), batch_size=4, shuffle=True,
        random_transform=True, num_workers=1,
    )  # fmt: skip
    state = torch.get_rng_state()
    for epoch in range(2):
        _epoch(loader, epoch)
    assert torch.equal(torch.get_rng_state(), state)
