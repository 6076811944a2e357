"""The batches of a detection run: :class:`TrainBatches` (the training batches of one process,
resumable within an epoch, each image's augmentation seeded by ``(seed, epoch, index)``
through :class:`EpochSeeded`) and :func:`eval_batches`."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler

from cenet.data.seeding import derive_seed, make_generator
from cenet.data.sharding import EpochKeys, StridedSampler


class EpochSeeded(Dataset):
    """A data set read with ``(index, epoch)`` keys (:class:`cenet.data.sharding.EpochKeys`)
    whose random transforms draw from a torch RNG seeded with ``(seed, epoch, index)`` for
    each item, so an image's augmentation does not depend on the loader's workers, on the
    items read before it or on a resume.

    Args:
        dataset: a map-style data set (e.g. :func:`cenet.detection.data.load_coco`).
        seed: the run's seed.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.skip_bad_images = bool(getattr(dataset, "skip_bad_images", False))

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, epoch = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, epoch, index, "augment"))
            return self.dataset[index]


class TrainBatches:
    """The training batches of one process: epoch ``e``'s order is a ``DistributedSampler``
    permutation seeded with ``(seed, e)`` (rank ``r`` of ``W`` loads positions ``r, r + W,
    ...``), cut into batches of ``batch_size``; :meth:`set_epoch` with ``start_batch=k``
    makes the next pass yield batches ``k, k+1, ...`` of the epoch without reading the
    images of the batches before.

    Args:
        dataset: the training set (items ``(image, target)``).
        batch_size: images per batch of this process.
        workers: DataLoader worker processes.
        seed: the run's seed.
        num_replicas, rank: the processes and this one.
        pin_memory: the DataLoader's ``pin_memory``.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        workers: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        pin_memory: bool = False,
    ) -> None:
        from cenet.detection.data import DetectionLoader

        self.batch_size = batch_size
        self.sampler = DistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True,
            seed=derive_seed(seed, "order"), drop_last=False,
        )  # fmt: skip
        self.keys = EpochKeys(self.sampler)
        self.loader = DetectionLoader(
            EpochSeeded(dataset, seed),
            distributed=num_replicas > 1,
            batch_size=batch_size,
            sampler=self.keys,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=pin_memory,
            generator=make_generator(seed, "workers"),
        )

    def __len__(self) -> int:
        """Batches of a full epoch."""
        return math.ceil(len(self.sampler) / self.batch_size)

    @property
    def bad_images(self) -> list[str]:
        """Unreadable images skipped in the current pass."""
        return self.loader.bad_images

    def set_epoch(self, epoch: int, *, start_batch: int = 0) -> None:
        """Select epoch ``epoch`` (from 0) and its first batch for the next pass.

        Raises:
            ValueError: if ``start_batch`` is not in ``0..len(self)``.
        """
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in 0..{len(self)}, got {start_batch}")
        self.sampler.set_epoch(epoch)
        self.keys.epoch = epoch
        self.keys.start = start_batch * self.batch_size

    def __iter__(self):
        return iter(self.loader)


def eval_batches(
    dataset: Dataset, *, batch_size: int, workers: int, num_replicas: int = 1, rank: int = 0
):
    """The evaluation batches of one process: images ``rank::num_replicas`` of ``dataset`` in
    order (uneven shards: every image is evaluated once over the processes)."""
    from cenet.detection.data import DetectionLoader

    return DetectionLoader(
        dataset,
        distributed=False,  # no collective per batch in evaluation: skipping is safe
        batch_size=batch_size,
        sampler=StridedSampler(len(dataset), num_replicas, rank),  # type: ignore[arg-type]
        num_workers=workers,
    )
