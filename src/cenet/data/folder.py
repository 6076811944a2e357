"""Any ImageFolder data set (``root/train/<class>/<image>`` plus ``root/val/`` or ``root/test/``),
read with ``torchvision.datasets.ImageFolder`` and transforms.v2 through a normal DataLoader."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from .augment import IMAGENET_MEAN, IMAGENET_STD
from .loader import EpochBatches
from .locate import EVAL_SPLITS, TRAIN_SPLIT
from .seeding import derive_seed, make_generator

log = logging.getLogger(__name__)

Sample = tuple[str, int]  # (image path, label)


def rgb_loader(path: str) -> Image.Image:
    """Open an image file as RGB (grayscale, palette and RGBA are converted; alpha dropped)."""
    with open(path, "rb") as f, Image.open(f) as im:
        return im.convert("RGB")


@dataclass(frozen=True)
class FolderSplits:
    """The file lists of an ImageFolder tree.

    Attributes:
        root: the directory holding ``train/`` and the evaluation split.
        train: ``(path, label)`` pairs of ``train/``, in ImageFolder's (class, file) order.
        test: pairs of the evaluation split, labelled with ``train/``'s class indices.
        classes: sorted class-folder names of ``train/``; label ``i`` is ``classes[i]``.
        eval_split: ``"val"`` or ``"test"`` (``val/`` wins if both exist).
    """

    root: Path
    train: list[Sample]
    test: list[Sample]
    classes: tuple[str, ...]
    eval_split: str


def scan_image_folder(root: str | os.PathLike[str]) -> FolderSplits:
    """List the images of ``root/train`` and ``root/val`` (or ``root/test``).

    Raises:
        FileNotFoundError: ``train/`` or both evaluation splits missing, or a class folder
            without images (from ImageFolder).
        ValueError: the evaluation split has a class that ``train/`` lacks.
    """
    r = Path(root)
    eval_split = next((s for s in EVAL_SPLITS if (r / s).is_dir()), None)
    if not (r / TRAIN_SPLIT).is_dir() or eval_split is None:
        raise FileNotFoundError(f"{r}: an ImageFolder data set needs train/ and val/ or test/")
    train = ImageFolder(str(r / TRAIN_SPLIT), loader=rgb_loader)
    test = ImageFolder(str(r / eval_split), loader=rgb_loader)
    extra = sorted(set(test.classes) - set(train.classes))
    if extra:
        raise ValueError(f"{r}: {eval_split}/ has classes {extra} that train/ lacks")
    test_samples = [(p, train.class_to_idx[test.classes[t]]) for p, t in test.samples]
    return FolderSplits(r, list(train.samples), test_samples, tuple(train.classes), eval_split)


def folder_transform(
    image_size: int,
    *,
    train: bool,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """PIL RGB image -> normalized float32 ``[3, image_size, image_size]``.

    Train: ``RandomResizedCrop(image_size)`` + horizontal flip. Eval:
    ``Resize(int(image_size / 0.875))`` (shorter side) + ``CenterCrop(image_size)``.
    """
    if train:
        geometry = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(int(image_size / 0.875), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose(
        [v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    )


def infer_image_size(samples: Sequence[Sample]) -> int:
    """The shorter side, in pixels, of the first image of ``samples``.

    Raises:
        ValueError: if ``samples`` is empty.
    """
    if not samples:
        raise ValueError("no images to infer image_size from")
    with Image.open(samples[0][0]) as im:
        return min(im.size)


class _SampleDataset(Dataset):
    """Map-style dataset keyed by ``(position, epoch)``; random transforms are seeded with
    ``(seed, epoch, position)`` so results do not depend on workers or batch order."""

    def __init__(self, samples: list[Sample], transform: v2.Compose, seed: int, random: bool):
        self.samples = samples
        self.transform = transform
        self.seed = seed
        self.random = random

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        pos, epoch = key
        path, label = self.samples[pos]
        image = rgb_loader(path)
        if not self.random:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, epoch, pos, "augment"))
            return self.transform(image), label


class _EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(position, epoch)`` keys for ``_SampleDataset``, lazily."""

    def __init__(self, order: torch.Tensor, epoch: int):
        self.order = order
        self.epoch = epoch

    def __len__(self) -> int:
        return self.order.numel()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for chunk in self.order.split(4096):
            for pos in chunk.tolist():
                yield pos, self.epoch


class FolderLoader(EpochBatches):
    """Batches of an image list through ``torch.utils.data.DataLoader``.

    Same contract as :class:`cenet.data.loader.TensorLoader`: order and random transforms
    of epoch ``e`` depend only on ``(seed, e)``; call :meth:`set_epoch` before each epoch.

    Args:
        samples: ``(path, label)`` pairs.
        transform: PIL image -> float32 ``[C, H, W]`` (see :func:`folder_transform`).
        batch_size: images per batch, >= 1.
        shuffle: new random order every epoch.
        drop_last: leave out the last, smaller batch.
        random_transform: ``transform`` draws random numbers (seed them per sample).
        seed: base seed.
        num_workers: DataLoader worker processes (0 = decode in this process).
        channels_last: yield images in ``torch.channels_last`` memory format.

    Yields:
        ``(images float32 [B, C, H, W], labels int64 [B])``.

    Raises:
        ValueError: ``batch_size < 1`` or ``num_workers < 0``.
    """

    def __init__(
        self,
        samples: list[Sample],
        *,
        transform: v2.Compose,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        random_transform: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        channels_last: bool = False,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = _SampleDataset(list(samples), transform, seed, random_transform)
        self.batch_size = batch_size
        self.num_samples = len(samples)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.num_workers = num_workers
        self.channels_last = channels_last
        self.epoch = 0
        self.start_batch = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.num_samples
        if self.shuffle:
            order = torch.randperm(n, generator=make_generator(self.seed, self.epoch, "order"))
        else:
            order = torch.arange(n)
        sampler = _EpochSampler(order[self.start_batch * self.batch_size :], self.epoch)
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=self.drop_last,
            num_workers=self.num_workers,
        )
        for x, y in loader:
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y

    def __repr__(self) -> str:
        return (
            f"FolderLoader(num_samples={self.num_samples}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, num_workers={self.num_workers}, epoch={self.epoch})"
        )
