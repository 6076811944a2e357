"""Which images each of ``W`` processes loads in distributed (DDP) training.

A training epoch has one global order; global batch ``k`` is positions ``k*B .. (k+1)*B - 1``
of it. Rank ``r`` of ``W`` loads positions ``r, r + W, r + 2W, ...`` of the order (what
``torch.utils.data.DistributedSampler`` picks) and cuts them into batches of ``B / W``, so its
batch ``k`` holds positions ``r, r + W, ...`` *of global batch* ``k``, and the ``W`` rank batches
together are exactly the single-process batch. "Even" shards give every rank the same number
of images, as ``DistributedSampler`` does: with ``drop_last`` the last ``N mod W`` positions are
left out, without it the order is padded to a multiple of ``W`` with repeats of its first
positions. Evaluation uses uneven shards instead: rank ``r`` takes positions ``r::W``, no
padding, so every image is counted once over the ranks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def check_shard(num_replicas: object, rank: object) -> None:
    """Check ``num_replicas`` (an int >= 1) and ``rank`` (an int in ``0..num_replicas-1``).

    Raises:
        ValueError: naming the value that is wrong and the valid range.
    """
    if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
        raise ValueError(
            f"num_replicas must be an integer >= 1 (the number of processes), got {num_replicas!r}"
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
        raise ValueError(
            f"rank must be an integer in 0..{num_replicas - 1} "
            f"(num_replicas={num_replicas}), got {rank!r}"
        )


def shard_size(n: int, num_replicas: int, rank: int, *, drop_last: bool, even: bool) -> int:
    """Number of positions of an ``n``-image order that rank ``rank`` loads.

    Even shards: ``n // W`` with ``drop_last``, else ``ceil(n / W)`` (``len`` of a
    ``DistributedSampler``). Uneven shards: ``len(range(rank, n, W))``.
    """
    if not even:
        return len(range(rank, n, num_replicas))
    return n // num_replicas if drop_last else math.ceil(n / num_replicas)


def shard_positions(
    n: int, num_replicas: int, rank: int, *, drop_last: bool, even: bool
) -> torch.Tensor:
    """Positions in an ``n``-image epoch order that rank ``rank`` loads, in loading order.

    Returns:
        int64 ``[shard_size(...)]``: ``rank, rank + W, ...``; for even shards without
        ``drop_last`` positions ``>= n`` wrap around to ``0, 1, ...`` (the padding
        ``DistributedSampler`` adds). With ``W = 1`` this is ``arange(n)``.
    """
    count = shard_size(n, num_replicas, rank, drop_last=drop_last, even=even)
    positions = rank + num_replicas * torch.arange(count)
    return positions % n if even and count * num_replicas > n else positions


class StridedSampler(Sampler[int]):
    """Indices ``rank, rank + W, ... < n`` of a data set of ``n`` items, no padding: the
    uneven evaluation shard (``DistributedSampler`` would pad with repeats)."""

    def __init__(self, n: int, num_replicas: int, rank: int) -> None:
        self.indices = range(rank, n, num_replicas)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


class EpochKeys(Sampler[tuple[int, int]]):
    """``(index, epoch)`` keys for the indices of ``sampler``, from its ``start``-th on.

    The loader sets ``epoch`` and ``start`` before it creates a DataLoader iterator (the
    sampler runs in the main process, also with persistent workers), so a resumed epoch skips
    the indices of the batches already trained on, and the data set can seed random transforms
    with the epoch.
    """

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler = sampler
        self.epoch = 0
        self.start = 0

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.start)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for index in itertools.islice(iter(self.sampler), self.start, None):
            yield index, epoch
