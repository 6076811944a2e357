"""Data for cenet: CIFAR-10 (JPEG archive or the official python release) as in-memory uint8
tensors with fast batch augmentation, or any ImageFolder tree through a DataLoader; both
sharded over the processes of distributed training (:mod:`cenet.data.sharding`).

The entry point is :func:`build_loaders`. This package imports only torch, torchvision, numpy,
PIL and the standard library.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    augment_batch,
    normalize,
    random_crop_flip,
)
from .badimage import BadImageError
from .cifar import CIFAR10_CLASSES, TensorSplits, load_cifar10
from .loader import Loader, TensorLoader
from .locate import DATASETS, DataSource, find_data, find_data_root, identify_data
from .noise import noisy_labels
from .sharding import check_shard
from .subset import balanced_subset, eval_order

__all__ = [
    "BadImageError",
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataSource",
    "DatasetInfo",
    "FolderLoader",
    "Loader",
    "TensorLoader",
    "TensorSplits",
    "augment_batch",
    "balanced_subset",
    "build_loaders",
    "find_data",
    "find_data_root",
    "identify_data",
    "load_cifar10",
    "noisy_labels",
    "normalize",
    "random_crop_flip",
]


def __getattr__(name: str) -> Any:
    # FolderLoader lives in .folder, which imports torchvision (1-2 s); load it on first use.
    if name == "FolderLoader":
        from .folder import FolderLoader

        return FolderLoader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class DatasetInfo:
    """What :func:`build_loaders` loaded.

    Attributes:
        name: ``"cifar10"``, or for ``dataset="folder"`` the folder's name.
        num_classes: number of classes ``K`` (labels are ``0..K-1``).
        classes: class names; label ``i`` is ``classes[i]``.
        num_train: training images after ``train_subset``.
        num_test: evaluation images (``test/`` or ``val/``).
        image_size: side in pixels of the (square) images the loaders yield.
        root: the archive or directory the data came from.
    """

    name: str
    num_classes: int
    classes: tuple[str, ...]
    num_train: int
    num_test: int
    image_size: int
    root: Path


def build_loaders(
    *,
    dataset: str = "cifar10",
    data: str | os.PathLike[str] | None = None,
    batch_size: int = 256,
    eval_batch_size: int | None = None,
    image_size: int | None = None,
    train_subset: int | None = None,
    label_noise: float = 0.0,
    seed: int = 0,
    num_workers: int = 0,
    download: bool = True,
    num_replicas: int = 1,
    rank: int = 0,
    skip_bad_images: bool = False,
    pin_memory: bool = False,
) -> tuple[Loader, Loader, DatasetInfo]:
    """Training and evaluation loaders for ``dataset``.

    Args:
        dataset: ``"cifar10"`` (in-memory uint8 tensors, batch crop+flip augmentation,
            CIFAR-10 normalization) or ``"folder"`` (ImageFolder tree through a DataLoader,
            RandomResizedCrop+flip / Resize+CenterCrop, ImageNet normalization).
        data: file or directory (``--data``); ``None`` searches ``$CENET_DATA``,
            ``../shared/data`` and the cache, then downloads (see :mod:`cenet.data.locate`).
        batch_size: the global training batch, >= 1: images per step summed over the
            ``num_replicas`` processes; each process's loader yields ``batch_size //
            num_replicas``.
        eval_batch_size: the global evaluation batch; ``None`` means ``batch_size``. Each
            process's evaluation loader yields ``ceil(eval_batch_size / num_replicas)``.
        image_size: output side in pixels. CIFAR-10: ``None`` or 32. Folder: ``None`` uses
            the shorter side of the first training image.
        train_subset: keep this many training images (class-balanced, fixed by ``seed``).
        label_noise: fraction ``p`` in [0, 1] of training labels replaced by uniformly random
            labels, fixed by ``seed`` (about ``p * (1 - 1/K)`` end up wrong).
        seed: seeds the subset, the label noise and (with the epoch) order and augmentation.
        num_workers: DataLoader workers for ``"folder"``; unused for ``"cifar10"`` (in memory).
        download: allow downloading CIFAR-10 if it is found nowhere else.
        num_replicas: number of processes ``W`` of distributed training, >= 1; must divide
            ``batch_size``. Every process calls this with its own ``rank``; no process group
            is needed.
        rank: this process, ``0..W-1``.
        skip_bad_images: ``"folder"``: skip unreadable images (logged as warnings, listed in
            the loader's ``bad_images``) instead of raising :class:`BadImageError`.
        pin_memory: yield batches in page-locked memory (for ``non_blocking`` copies to a
            GPU); ignored when no accelerator is available.

    Returns:
        ``(train_loader, test_loader, info)``. Both loaders yield ``(images float32
        [B, 3, S, S], labels int64 [B])`` and have ``__len__`` (batches per epoch),
        ``set_epoch(epoch, start_batch=0)``, ``batch_size`` (this process's batch),
        ``num_samples`` (images this process loads per epoch), ``total_samples`` (images in
        the data set), ``num_replicas``, ``rank`` and ``bad_images`` (paths skipped in the
        current pass). The training loader shuffles and augments, and drops the last partial
        batch when there is at least one full global batch (so no step sees a tiny batch);
        the test loader does none of this and yields the test set in a fixed random order,
        the same for every run (:func:`cenet.data.subset.eval_order`), so that its first
        batches sample every class.

        Distributed (``W > 1``): the training loader of rank ``r`` yields, as its batch
        ``k``, positions ``r, r + W, r + 2W, ...`` of global batch ``k`` of the single-process
        loader (same images, crops and flips; ``DistributedSampler``'s striding), and
        ``len`` is the number of global batches on every rank; ``set_epoch(e,
        start_batch=k)`` resumes every rank at global batch ``k``. Only when there are fewer
        training images than one global batch (no ``drop_last``) is that one batch padded,
        as ``DistributedSampler`` pads, with up to ``W - 1`` repeated images so that every
        rank gets as many. The test loader of rank ``r`` yields the test positions ``r::W``
        (no padding: ``num_samples`` is this rank's count, ``total_samples`` the test set's,
        and summing over ranks counts every test image once; ``len`` may differ by one
        between ranks, so do not run a collective per evaluation batch).

    Raises:
        ValueError: unknown ``dataset``, ``batch_size``/``eval_batch_size < 1``,
            ``label_noise`` outside [0, 1], ``train_subset`` outside ``1..num_train``,
            ``num_workers < 0``, a bad ``image_size``, ``num_replicas < 1``, ``rank`` outside
            ``0..num_replicas-1``, ``batch_size`` not a multiple of ``num_replicas``, or data
            that is not what ``dataset`` needs (e.g. non-CIFAR classes).
        FileNotFoundError: no data found (the message lists every place looked at).
        BadImageError: (a ``ValueError``) ``"folder"`` with ``image_size=None`` and an
            unreadable first training image; while iterating, an unreadable image (see
            :class:`cenet.data.folder.FolderLoader`).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
    _check_int("batch_size", batch_size, 1)
    _check_int("eval_batch_size", eval_batch_size, 1)
    _check_int("train_subset", train_subset, 1, none="all training images")
    _check_int("image_size", image_size, 1, none="the native size")
    _check_int("num_workers", num_workers, 0)
    check_shard(num_replicas, rank)
    if batch_size % num_replicas:
        raise ValueError(
            f"batch_size={batch_size} is not a multiple of num_replicas={num_replicas}: the "
            f"global batch is split evenly over the processes; use a multiple of {num_replicas}"
            f" (e.g. {max(1, batch_size // num_replicas) * num_replicas})"
        )
    for name, flag in (("skip_bad_images", skip_bad_images), ("pin_memory", pin_memory)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if not (
        isinstance(label_noise, int | float)
        and math.isfinite(label_noise)
        and 0.0 <= label_noise <= 1.0
    ):
        raise ValueError(f"label_noise must be a fraction in [0, 1], got {label_noise!r}")
    if dataset == "cifar10" and image_size not in (None, 32):
        raise ValueError(
            f"CIFAR-10 images are 32x32; image_size must be None or 32, got "
            f"{image_size} (use dataset='folder' to resize an ImageFolder tree)"
        )

    source = find_data(data, dataset=dataset, download=download)
    shard = _Shard(num_replicas, rank, pin_memory)
    if dataset == "cifar10":
        return _cifar10_loaders(
            source, batch_size, eval_batch_size, train_subset, label_noise, seed, shard
        )
    return _folder_loaders(
        source.path,
        batch_size,
        eval_batch_size,
        image_size,
        train_subset,
        label_noise,
        seed,
        num_workers,
        skip_bad_images,
        shard,
    )


@dataclass(frozen=True)
class _Shard:
    """This process's place in distributed training and where its batches go."""

    num_replicas: int
    rank: int
    pin_memory: bool


def _check_int(name: str, value: object, minimum: int, *, none: str | None = None) -> None:
    if none is not None and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        also = f" or None ({none})" if none is not None else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{also}, got {value!r}")


def _check_subset(train_subset: int | None, total: int) -> None:
    if train_subset is not None and train_subset > total:
        raise ValueError(
            f"train_subset={train_subset} exceeds the {total} training images; "
            f"use a value in 1..{total} or None for all"
        )


def _cifar10_loaders(
    source: DataSource,
    batch_size: int,
    eval_batch_size: int,
    train_subset: int | None,
    label_noise: float,
    seed: int,
    shard: _Shard,
) -> tuple[Loader, Loader, DatasetInfo]:
    splits = load_cifar10(source)
    x, y = splits.train_images, splits.train_labels
    _check_subset(train_subset, len(y))
    if train_subset is not None and train_subset < len(y):
        keep = balanced_subset(y, train_subset, seed=seed)
        x, y = x.index_select(0, keep), y.index_select(0, keep)
    k = len(splits.classes)
    if label_noise > 0:
        y = noisy_labels(y, label_noise, k, seed=seed)
    train = TensorLoader(
        x,
        y,
        batch_size=batch_size // shard.num_replicas,
        shuffle=True,
        augment=True,
        drop_last=len(y) >= batch_size,
        seed=seed,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        num_replicas=shard.num_replicas,
        rank=shard.rank,
        pin_memory=shard.pin_memory,
    )
    order = eval_order(len(splits.test_labels))
    test = TensorLoader(
        splits.test_images.index_select(0, order),
        splits.test_labels.index_select(0, order),
        batch_size=math.ceil(eval_batch_size / shard.num_replicas),
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        num_replicas=shard.num_replicas,
        rank=shard.rank,
        even_shards=False,
        pin_memory=shard.pin_memory,
    )
    info = DatasetInfo(
        "cifar10", k, splits.classes, len(y), len(splits.test_labels), 32, source.path
    )
    return train, test, info


def _folder_loaders(
    root: Path,
    batch_size: int,
    eval_batch_size: int,
    image_size: int | None,
    train_subset: int | None,
    label_noise: float,
    seed: int,
    num_workers: int,
    skip_bad_images: bool,
    shard: _Shard,
) -> tuple[Loader, Loader, DatasetInfo]:
    import torch

    from .folder import FolderLoader, folder_transform, infer_image_size, scan_image_folder

    splits = scan_image_folder(root)
    samples = splits.train
    _check_subset(train_subset, len(samples))
    labels = torch.tensor([t for _, t in samples], dtype=torch.int64)
    if train_subset is not None and train_subset < len(samples):
        keep = balanced_subset(labels, train_subset, seed=seed)
        samples = [samples[i] for i in keep.tolist()]
        labels = labels.index_select(0, keep)
    k = len(splits.classes)
    if label_noise > 0:
        labels = noisy_labels(labels, label_noise, k, seed=seed)
        samples = [(p, t) for (p, _), t in zip(samples, labels.tolist(), strict=True)]
    if image_size is None:
        size = infer_image_size(samples, skip_bad_images=skip_bad_images)
    else:
        size = image_size
    train = FolderLoader(
        samples,
        transform=folder_transform(size, train=True),
        batch_size=batch_size // shard.num_replicas,
        shuffle=True,
        random_transform=True,
        drop_last=len(samples) >= batch_size,
        seed=seed,
        num_workers=num_workers,
        skip_bad_images=skip_bad_images,
        num_replicas=shard.num_replicas,
        rank=shard.rank,
        pin_memory=shard.pin_memory,
    )
    test = FolderLoader(
        [splits.test[i] for i in eval_order(len(splits.test)).tolist()],
        transform=folder_transform(size, train=False),
        batch_size=math.ceil(eval_batch_size / shard.num_replicas),
        num_workers=num_workers,
        skip_bad_images=skip_bad_images,
        num_replicas=shard.num_replicas,
        rank=shard.rank,
        even_shards=False,
        pin_memory=shard.pin_memory,
    )
    info = DatasetInfo(root.name, k, splits.classes, len(samples), len(splits.test), size, root)
    return train, test, info
