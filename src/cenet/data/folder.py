"""Any ImageFolder data set (``root/train/<class>/<image>`` plus ``root/val/`` or ``root/test/``),
read with ``torchvision.datasets.ImageFolder`` and transforms.v2 through one DataLoader per
loader (built once, persistent workers), sharded over distributed processes with
``DistributedSampler``; unreadable images are reported or skipped in the main process
(:mod:`cenet.data.badimage`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from .augment import IMAGENET_MEAN, IMAGENET_STD
from .badimage import BadImage, BadImageError, BatchCollate, open_rgb
from .loader import EpochBatches
from .locate import EVAL_SPLITS, TRAIN_SPLIT
from .seeding import derive_seed, make_generator
from .sharding import EpochKeys, StridedSampler

log = logging.getLogger(__name__)

Sample = tuple[str, int]  # (image path, label)


def rgb_loader(path: str) -> Image.Image:
    """Open an image file as RGB (grayscale, palette and RGBA are converted; alpha dropped).

    Raises:
        BadImageError: the file cannot be read or decoded (names the file and the reason).
    """
    image = open_rgb(path)
    if isinstance(image, BadImage):
        raise BadImageError(image.path, image.reason)
    return image


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


def infer_image_size(samples: Sequence[Sample], *, skip_bad_images: bool = False) -> int:
    """The shorter side, in pixels, of the first (readable) image of ``samples``.

    Only the header is read. With ``skip_bad_images`` unreadable files are logged and passed
    over.

    Raises:
        ValueError: if ``samples`` is empty (or has no readable image).
        BadImageError: the first image cannot be read and ``skip_bad_images`` is off.
    """
    if not samples:
        raise ValueError("no images to infer image_size from")
    for path, _ in samples:
        try:
            with Image.open(path) as im:
                return min(im.size)
        except Exception as exc:  # any failure to read this one file is a property of the file
            reason = f"{type(exc).__name__}: {exc}"
            if not skip_bad_images:
                raise BadImageError(str(path), reason) from None
            log.warning("skipping unreadable image %s (%s)", path, reason)
    raise ValueError("no readable image to infer image_size from")


class _SampleDataset(Dataset):
    """Map-style dataset keyed by ``(index, epoch)``; random transforms are seeded with
    ``(seed, epoch, index)`` so results do not depend on workers, ranks or batch order.
    Returns ``(image float32 [C, H, W] or BadImage, label)``: decode errors never raise here
    (that is, in a worker), they travel to the main process as markers."""

    def __init__(self, samples: list[Sample], transform: v2.Compose, seed: int, random: bool):
        self.samples = samples
        self.transform = transform
        self.seed = seed
        self.random = random

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor | BadImage, int]:
        index, epoch = key
        path, label = self.samples[index]
        image = open_rgb(path)
        if isinstance(image, BadImage):
            return image, label
        if not self.random:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, epoch, index, "augment"))
            return self.transform(image), label


class FolderLoader(EpochBatches):
    """Batches of an image list through one ``torch.utils.data.DataLoader``.

    Same contract as :class:`cenet.data.loader.TensorLoader`: order and random transforms
    of epoch ``e`` depend only on ``(seed, e)``; call :meth:`set_epoch` before each epoch.
    The DataLoader is built once, with persistent workers (``num_workers > 0``), so worker
    processes live across epochs; the epoch and the resume point go to the sampler, which
    runs in this process, whenever an iteration starts.

    Sharding (``num_replicas = W``): with even shards (training) a
    ``torch.utils.data.DistributedSampler(num_replicas=W, rank=rank, shuffle=shuffle,
    seed=derive_seed(seed, "order"), drop_last=drop_last)`` gives rank ``r`` positions
    ``r, r + W, ...`` of the epoch's permutation, so its batch ``k`` holds positions ``r, r +
    W, ...`` of global batch ``k`` (batch ``batch_size * W``); uneven shards (evaluation)
    give rank ``r`` the images ``r::W`` of ``samples``, no padding.

    Unreadable images (:func:`cenet.data.badimage.open_rgb`) are dropped from their batch in
    the worker and reported here: :class:`BadImageError` naming the file, or, with
    ``skip_bad_images``, a warning on logger ``cenet.data.folder`` and the path appended to
    ``bad_images`` (reset by ``set_epoch`` and at the start of each pass). A batch whose
    images are all unreadable raises :class:`BadImageError` either way.

    Args:
        samples: ``(path, label)`` pairs.
        transform: PIL image -> float32 ``[C, H, W]`` (see :func:`folder_transform`).
        batch_size: images per batch of this process, >= 1.
        shuffle: new random order every epoch.
        drop_last: leave out the last, smaller batch.
        random_transform: ``transform`` draws random numbers (seed them per sample).
        seed: base seed.
        num_workers: DataLoader worker processes (0 = decode in this process).
        channels_last: yield images in ``torch.channels_last`` memory format.
        num_replicas: number of processes ``W``, >= 1.
        rank: this process, ``0..W-1``.
        even_shards: ``DistributedSampler`` shards of equal size (training); ``False``:
            ``r::W`` without padding (evaluation).
        skip_bad_images: skip unreadable images instead of raising.
        pin_memory: the DataLoader's ``pin_memory`` (ignored without an accelerator).
        prefetch_factor: batches each worker loads ahead; ``None`` = DataLoader's default
            (2); unused without workers.

    Yields:
        ``(images float32 [B, C, H, W], labels int64 [B])``, ``B <= batch_size`` (fewer when
        images were skipped).

    Raises:
        ValueError: ``batch_size < 1``, ``num_workers < 0``, ``num_replicas < 1``, ``rank``
            outside ``0..num_replicas-1``, ``prefetch_factor < 1``.
        BadImageError: while iterating, for an unreadable image (see above).
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
        num_replicas: int = 1,
        rank: int = 0,
        even_shards: bool = True,
        skip_bad_images: bool = False,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        if prefetch_factor is not None and prefetch_factor < 1:
            raise ValueError(f"prefetch_factor must be >= 1 or None, got {prefetch_factor!r}")
        self._init_batches(len(samples), batch_size, drop_last, num_replicas, rank, even_shards)
        self.dataset = _SampleDataset(list(samples), transform, seed, random_transform)
        self.shuffle = shuffle
        self.seed = seed
        self.num_workers = num_workers
        self.channels_last = channels_last
        self.skip_bad_images = skip_bad_images
        self.sampler: Sampler[int]
        if even_shards:
            self.sampler = DistributedSampler(
                self.dataset,
                num_replicas=num_replicas,
                rank=rank,
                shuffle=shuffle,
                seed=derive_seed(seed, "order"),
                drop_last=drop_last,
            )
        else:
            self.sampler = StridedSampler(len(samples), num_replicas, rank)
        self.keys = EpochKeys(self.sampler)
        self.loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self.keys,
            drop_last=drop_last,
            num_workers=num_workers,
            collate_fn=BatchCollate(channels_last),
            pin_memory=pin_memory and torch.accelerator.is_available(),
            persistent_workers=num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            # the workers' base seed; a private generator leaves the global RNG alone
            generator=make_generator(seed, "workers"),
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(self.epoch)
        self.keys.epoch = self.epoch
        self.keys.start = self.start_batch * self.batch_size
        self.bad_images = []
        return self._batches(iter(self.loader))

    def _batches(self, batches: Iterator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, bad in batches:
            for path, reason in bad:
                if not self.skip_bad_images:
                    raise BadImageError(path, reason)
                log.warning("skipping unreadable image %s (%s)", path, reason)
                self.bad_images.append(path)
            if images is None:
                path, reason = bad[0]
                raise BadImageError(
                    path,
                    reason,
                    message=f"all {len(bad)} images of a batch are unreadable (the first: "
                    f"{path}: {reason}); a batch cannot be empty, so skipping them does not "
                    f"help: remove or replace these files",
                )
            yield images, labels

    def __repr__(self) -> str:
        return (
            f"FolderLoader(num_samples={self.num_samples}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, num_workers={self.num_workers}, epoch={self.epoch}, "
            f"rank={self.rank}/{self.num_replicas})"
        )
