"""``TensorLoader``: batches from in-memory uint8 tensors, shuffled and augmented as a pure
function of (seed, epoch), and the ``Loader`` protocol both loaders follow."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch

from .augment import CIFAR10_MEAN, CIFAR10_STD, draw_crop_flip, normalize, random_crop_flip
from .seeding import make_generator

Batch = tuple[torch.Tensor, torch.Tensor]


@runtime_checkable
class Loader(Protocol):
    """What the trainer relies on: iterate ``(images float32 [B, C, H, W], labels int64 [B])``.

    Attributes:
        batch_size: images per batch (the last batch may be smaller unless ``drop_last``).
        num_samples: images in the data set behind the loader.
    """

    batch_size: int
    num_samples: int

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Batch]: ...

    def set_epoch(self, epoch: int, *, start_batch: int = 0) -> None: ...


class EpochBatches:
    """Epoch selection and batch counting shared by the loaders: ``set_epoch`` and ``len``.

    Subclasses set ``num_samples``, ``batch_size`` and ``drop_last``; ``epoch`` and
    ``start_batch`` select what ``__iter__`` yields.
    """

    num_samples: int
    batch_size: int
    drop_last: bool
    epoch: int = 0
    start_batch: int = 0

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

    def __len__(self) -> int:
        """Number of batches per epoch."""
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

    Args:
        images: uint8 ``[N, C, H, W]``.
        labels: int64 ``[N]``.
        batch_size: images per batch, >= 1.
        shuffle: new random order every epoch.
        drop_last: leave out the last, smaller batch.
        augment: random crop (zero padding ``padding``) and horizontal flip.
        seed: base seed.
        mean, std: per-channel normalization of images scaled to [0, 1].
        padding: crop padding in pixels.
        channels_last: yield images in ``torch.channels_last`` memory format.

    Yields:
        ``(images float32 [B, C, H, W], labels int64 [B])``.

    Raises:
        ValueError: for wrong dtypes or shapes, ``batch_size < 1`` or ``padding < 0``.
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
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.num_samples = int(images.shape[0])
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.seed = seed
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.padding = padding
        self.channels_last = channels_last
        self.epoch = 0
        self.start_batch = 0

    def __iter__(self) -> Iterator[Batch]:
        n, bs = self.num_samples, self.batch_size
        if self.shuffle:
            order = torch.randperm(n, generator=make_generator(self.seed, self.epoch, "order"))
        else:
            order = torch.arange(n)
        if self.augment:
            g = make_generator(self.seed, self.epoch, "augment")
            offsets, flips = draw_crop_flip(n, padding=self.padding, generator=g)
        for b in range(self.start_batch, len(self)):
            sl = slice(b * bs, (b + 1) * bs)
            idx = order[sl]
            x = self.images.index_select(0, idx)
            if self.augment:
                x = random_crop_flip(x, padding=self.padding, offsets=offsets[sl], flip=flips[sl])
            x = normalize(x, self.mean, self.std, channels_last=self.channels_last)
            yield x, self.labels.index_select(0, idx)

    def __repr__(self) -> str:
        return (
            f"TensorLoader(num_samples={self.num_samples}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, drop_last={self.drop_last}, augment={self.augment}, "
            f"seed={self.seed}, epoch={self.epoch})"
        )
