"""``TensorLoader``: batches from in-memory uint8 tensors, shuffled and augmented as a pure
function of (seed, epoch), sharded over distributed processes (see :mod:`cenet.data.sharding`),
and the ``Loader`` protocol both loaders follow."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch

from .augment import CIFAR10_MEAN, CIFAR10_STD, draw_crop_flip, normalize, random_crop_flip
from .seeding import make_generator
from .sharding import check_shard, shard_positions, shard_size

Batch = tuple[torch.Tensor, torch.Tensor]


@runtime_checkable
class Loader(Protocol):
    """What the trainer relies on: iterate ``(images float32 [B, C, H, W], labels int64 [B])``.

    Attributes:
        batch_size: images per batch of this process (the last batch may be smaller unless
            ``drop_last``; with ``num_replicas`` processes the global batch is
            ``batch_size * num_replicas``).
        num_samples: images this process loads per epoch (its shard, see
            :mod:`cenet.data.sharding`; the whole data set for one process).
        total_samples: images in the data set behind the loader (all processes).
        bad_images: paths of unreadable images skipped since the last ``set_epoch`` or the
            start of the last pass (always empty for in-memory data).
    """

    batch_size: int
    num_samples: int
    total_samples: int
    bad_images: list[str]

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Batch]: ...

    def set_epoch(self, epoch: int, *, start_batch: int = 0) -> None: ...


class EpochBatches:
    """Epoch selection, sharding and batch counting shared by the loaders: ``set_epoch`` and
    ``len``.

    Subclasses call :meth:`_init_batches`; ``epoch`` and ``start_batch`` select what
    ``__iter__`` yields.
    """

    num_samples: int
    total_samples: int
    batch_size: int
    drop_last: bool
    num_replicas: int = 1
    rank: int = 0
    even_shards: bool = True
    epoch: int = 0
    start_batch: int = 0
    bad_images: list[str]

    def _init_batches(
        self,
        n: int,
        batch_size: int,
        drop_last: bool,
        num_replicas: int,
        rank: int,
        even_shards: bool,
    ) -> None:
        """Check and set the batch and shard attributes for a data set of ``n`` images.

        Raises:
            ValueError: ``batch_size < 1``, ``num_replicas < 1`` or ``rank`` outside
                ``0..num_replicas-1``.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        check_shard(num_replicas, rank)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.even_shards = even_shards
        self.total_samples = n
        self.num_samples = shard_size(n, num_replicas, rank, drop_last=drop_last, even=even_shards)
        self.epoch = 0
        self.start_batch = 0
        self.bad_images = []

    def set_epoch(self, epoch: int, *, start_batch: int = 0) -> None:
        """Select epoch ``epoch`` (>= 0) and the batch to start from (``0..len(self)``).

        Raises:
            ValueError: if ``epoch < 0`` or ``start_batch`` is out of range.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in 0..{len(self)}, got {start_batch}")
        self.epoch = epoch
        self.start_batch = start_batch
        self.bad_images = []

    def __len__(self) -> int:
        """Number of batches per epoch (the same on every rank for even shards: the number of
        global batches)."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)


class TensorLoader(EpochBatches):
    """Iterates normalized float32 batches from uint8 images held in memory.

    The order (``shuffle``) and the crop/flip draws (``augment``) of epoch ``e`` depend only on
    ``(seed, e)``: call :meth:`set_epoch` before each epoch (as with ``DistributedSampler``;
    without it every pass repeats the same epoch). Draws are made per position in the epoch's
    order, so ``set_epoch(e, start_batch=k)`` yields exactly batches ``k, k+1, ...`` of the
    full epoch, for resuming mid-epoch.

    With ``num_replicas = W`` processes, rank ``r`` loads positions ``r, r + W, ...`` of the
    epoch's order (:mod:`cenet.data.sharding`): its batch ``k`` holds positions ``r, r + W,
    ...`` of batch ``k`` of a single-process loader with batch ``batch_size * W``, with the same
    crops and flips. ``W = 1`` is the single-process loader.

    Args:
        images: uint8 ``[N, C, H, W]``.
        labels: int64 ``[N]``.
        batch_size: images per batch of this process, >= 1.
        shuffle: new random order every epoch.
        drop_last: leave out the last, smaller batch.
        augment: random crop (zero padding ``padding``) and horizontal flip.
        seed: base seed.
        mean, std: per-channel normalization of images scaled to [0, 1].
        padding: crop padding in pixels.
        channels_last: yield images in ``torch.channels_last`` memory format.
        num_replicas: number of processes ``W`` sharing the epoch, >= 1.
        rank: this process, ``0..W-1``.
        even_shards: every rank gets ``len(self)`` batches of equal size, as with
            ``DistributedSampler`` (training): without ``drop_last`` the order is padded
            with repeats of its first positions to a multiple of ``W``. ``False``: rank ``r``
            gets positions ``r::W`` exactly once, no padding (evaluation; ``num_samples`` and
            ``len`` may then differ by one between ranks).
        pin_memory: yield batches in page-locked memory, for asynchronous copies to the GPU
            (ignored when no accelerator is available).

    Yields:
        ``(images float32 [B, C, H, W], labels int64 [B])``, ``B <= batch_size``.

    Raises:
        ValueError: for wrong dtypes or shapes, ``batch_size < 1``, ``padding < 0``,
            ``num_replicas < 1`` or ``rank`` outside ``0..num_replicas-1``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        augment: bool = False,
        seed: int = 0,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        padding: int = 4,
        channels_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        even_shards: bool = True,
        pin_memory: bool = False,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must be int64 [{images.shape[0]}], got {labels.dtype} "
                f"{tuple(labels.shape)}"
            )
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        n = int(images.shape[0])
        self._init_batches(n, batch_size, drop_last, num_replicas, rank, even_shards)
        self.positions = shard_positions(
            n, num_replicas, rank, drop_last=drop_last, even=even_shards
        )
        self.images = images
        self.labels = labels
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.padding = padding
        self.channels_last = channels_last
        self.pin_memory = pin_memory and torch.accelerator.is_available()

    def __iter__(self) -> Iterator[Batch]:
        n, bs = self.total_samples, self.batch_size
        if self.shuffle:
            order = torch.randperm(n, generator=make_generator(self.seed, self.epoch, "order"))
        else:
            order = torch.arange(n)
        if self.augment:
            g = make_generator(self.seed, self.epoch, "augment")
            offsets, flips = draw_crop_flip(n, padding=self.padding, generator=g)
        self.bad_images = []
        for b in range(self.start_batch, len(self)):
            pos = self.positions[b * bs : (b + 1) * bs]  # positions in the epoch's order
            idx = order[pos]
            x = self.images.index_select(0, idx)
            if self.augment:
                x = random_crop_flip(x, padding=self.padding, offsets=offsets[pos], flip=flips[pos])
            x = normalize(x, self.mean, self.std, channels_last=self.channels_last)
            y = self.labels.index_select(0, idx)
            if self.pin_memory:
                x, y = x.pin_memory(), y.pin_memory()
            yield x, y

    def __repr__(self) -> str:
        return (
            f"TensorLoader(num_samples={self.num_samples}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, drop_last={self.drop_last}, augment={self.augment}, "
            f"seed={self.seed}, epoch={self.epoch}, rank={self.rank}/{self.num_replicas})"
        )
