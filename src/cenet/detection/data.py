"""COCO-format detection data: :func:`load_coco` (torchvision's ``CocoDetection`` wrapped for
transforms v2, with the data checked once at construction), :func:`collate_detection` and
:func:`detection_loader`.

Unreadable image files follow :mod:`cenet.data.badimage`: the file is decoded where it is read
(a DataLoader worker), a failure travels to the main process as a :class:`BadImage` marker, and
the main process raises :class:`BadImageError` naming the file, or, with ``skip_bad_images``,
drops the image from its batch, logs it and counts it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    get_worker_info,
)
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2

from cenet.data.badimage import BadImage, BadImageError, open_rgb
from cenet.data.seeding import make_generator

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'cenet[detection]' (or pip install pycocotools)"

Target = dict[str, Any]


def require_pycocotools() -> None:
    """Raise a clear :class:`ImportError` when pycocotools is not installed."""
    try:
        import pycocotools  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"COCO data and evaluation need pycocotools: {INSTALL_HINT}") from exc


class CocoLayoutError(FileNotFoundError):
    """A COCO data root without the expected annotation file or image folder.

    Attributes:
        path: the path that was looked for.
    """

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(message)
        self.path = str(path)


def coco_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """The image folder and annotation file of ``split`` in the COCO 2017 layout:
    ``root/{split}/`` and ``root/annotations/instances_{split}.json``.

    Returns:
        ``(image_folder, annotation_file)``.

    Raises:
        CocoLayoutError: (a ``FileNotFoundError``) either is missing; the message names the
            path looked for and the expected layout.
    """
    root = Path(root)
    image_dir = root / split
    ann_file = root / "annotations" / f"instances_{split}.json"
    layout = (
        f"expected the COCO 2017 layout: {root}/annotations/instances_{split}.json and the "
        f"images in {root}/{split}/"
    )
    if not ann_file.is_file():
        raise CocoLayoutError(ann_file, f"COCO annotation file not found: {ann_file}; {layout}")
    if not image_dir.is_dir():
        raise CocoLayoutError(image_dir, f"COCO image folder not found: {image_dir}; {layout}")
    return image_dir, ann_file


def _usable(ann: dict) -> bool:
    """A non-crowd annotation whose box is at least 1 px wide and high."""
    _, _, w, h = ann["bbox"]
    return not ann.get("iscrowd", 0) and w >= 1 and h >= 1


class _Unreadable(Exception):
    def __init__(self, marker: BadImage) -> None:
        super().__init__(marker.path, marker.reason)
        self.marker = marker


class _CocoImages(CocoDetection):
    """``CocoDetection`` that decodes with :func:`open_rgb` (a bad file raises
    :class:`_Unreadable`) and keeps only usable annotations (:func:`_usable`)."""

    def _load_image(self, id: int):
        path = os.path.join(self.root, self.coco.loadImgs(id)[0]["file_name"])
        image = open_rgb(path)
        if isinstance(image, BadImage):
            raise _Unreadable(image)
        return image

    def _load_target(self, id: int) -> list[dict]:
        return [a for a in self.coco.imgToAnns.get(id, []) if _usable(a)]


def default_transforms(train: bool) -> v2.Compose:
    """PIL image -> float32 ``[3, H, W]`` in [0, 1]; in training also a horizontal flip with
    probability 0.5 (boxes and masks flipped with the image)."""
    steps: list[Callable] = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if train:
        steps.append(v2.RandomHorizontalFlip(0.5))
    return v2.Compose(steps)


class CocoDetectionSet(Dataset):
    """A COCO detection split, checked at construction; build it with :func:`load_coco`.

    Item ``i`` is ``(image, target)`` (see :func:`load_coco`), or ``(BadImage, {"image_id":
    id})`` for an unreadable file read in a DataLoader worker or with ``skip_bad_images``.

    Attributes:
        coco: the ``pycocotools.coco.COCO`` ground truth of the whole annotation file.
        ids: the image ids kept, in item order.
        category_names: ``{category id: name}``.
        num_classes_needed: largest category id + 1 (the ``num_classes`` of a torchvision
            detection model, class 0 being the background).
        missing_images: file names listed in the annotation file but absent on disk (left out).
        dropped_images: file names left out in training for want of a usable annotation.
        image_dir, annotation_file: the paths read.
        train, with_masks, skip_bad_images: as given to :func:`load_coco`.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        train: bool,
        num_classes: int | None,
        with_masks: bool,
        skip_bad_images: bool,
        transforms: Callable | None,
    ) -> None:
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
        ):
            raise ValueError(
                f"num_classes must be None or an integer >= 2 (the background and at least one "
                f"category), got {num_classes!r}"
            )
        self.image_dir, self.annotation_file = coco_paths(root, split)
        require_pycocotools()
        self.train = train
        self.with_masks = with_masks
        self.skip_bad_images = skip_bad_images
        if transforms is None:
            transforms = default_transforms(train)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            base = _CocoImages(
                str(self.image_dir), str(self.annotation_file), transforms=transforms
            )
        log.debug("%s", out.getvalue().strip())
        self.coco = base.coco
        anns = self.coco.dataset.get("annotations", [])
        self.category_names: dict[int, str] = {
            int(c["id"]): str(c["name"]) for c in self.coco.dataset.get("categories", [])
        }
        self._check_categories(anns, num_classes)
        if with_masks:
            self._check_segmentations(anns)
        base.ids = self._kept_ids(base.ids)
        self.ids: list[int] = base.ids
        keys = (
            ("boxes", "labels", "masks", "image_id")
            if with_masks
            else ("boxes", "labels", "image_id")
        )
        self._wrapped = wrap_dataset_for_transforms_v2(base, target_keys=keys)

    @property
    def num_classes_needed(self) -> int:
        """The smallest ``num_classes`` whose box predictor holds every category id of the
        annotation file (labels are category ids, background 0): max id + 1."""
        ids = [a["category_id"] for a in self.coco.dataset.get("annotations", [])]
        return max([0, *ids, *self.category_names]) + 1

    def _check_categories(self, anns: list[dict], num_classes: int | None) -> None:
        bad = sorted(
            {
                int(a["category_id"])
                for a in anns
                if a["category_id"] < 1
                or (num_classes is not None and a["category_id"] >= num_classes)
            }
        )
        if not bad:
            return
        bad_set = set(bad)
        count = sum(a["category_id"] in bad_set for a in anns)
        needed = self.num_classes_needed
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        allowed = f"1..{num_classes - 1}" if num_classes is not None else ">= 1"
        raise ValueError(
            f"{self.annotation_file}: {count} annotations have category ids {shown} outside "
            f"{allowed} (num_classes={num_classes}); category ids must be >= 1 (0 is the "
            f"background) and num_classes must be > the largest category id, here "
            f"num_classes={needed} or more"
        )

    def _check_segmentations(self, anns: list[dict]) -> None:
        lacking = [a["id"] for a in anns if _usable(a) and not a.get("segmentation")]
        if lacking:
            raise ValueError(
                f"{self.annotation_file}: {len(lacking)} annotations have no segmentation (ids "
                f"{lacking[:10]}); masks need one for every non-crowd annotation: pass "
                f"with_masks=False for boxes only"
            )

    def _kept_ids(self, ids: list[int]) -> list[int]:
        if not ids:
            raise ValueError(f"{self.annotation_file} lists no images")
        names = {i: self.coco.imgs[i]["file_name"] for i in ids}
        on_disk = {e.name for e in os.scandir(self.image_dir)}
        present = [
            i
            for i in ids
            if names[i] in on_disk or ("/" in names[i] and (self.image_dir / names[i]).is_file())
        ]
        present_set = set(present)
        self.missing_images = [names[i] for i in ids if i not in present_set]
        if not present:
            raise CocoLayoutError(
                self.image_dir,
                f"none of the {len(ids)} images listed in {self.annotation_file} is in "
                f"{self.image_dir} (the first: {names[ids[0]]}); expected the images of the "
                f"split in {self.image_dir}/",
            )
        if self.missing_images:
            log.warning(
                "%d of %d images listed in %s are not in %s and are left out (the first: %s)",
                len(self.missing_images),
                len(ids),
                self.annotation_file,
                self.image_dir,
                self.missing_images[0],
            )
        self.dropped_images: list[str] = []
        if not self.train:
            return present
        anns = self.coco.imgToAnns
        kept = [i for i in present if any(_usable(a) for a in anns.get(i, []))]
        kept_set = set(kept)
        self.dropped_images = [names[i] for i in present if i not in kept_set]
        if not kept:
            raise ValueError(
                f"no image of {self.annotation_file} found in {self.image_dir} has a usable "
                f"annotation (not crowd, box at least 1 px wide and high); training needs one"
            )
        if self.dropped_images:
            log.info(
                "left out %d of %d training images without a usable annotation (%s)",
                len(self.dropped_images),
                len(present),
                self.annotation_file,
            )
        return kept

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | BadImage, Target]:
        try:
            image, target = self._wrapped[index]
        except _Unreadable as exc:
            if not self.skip_bad_images and get_worker_info() is None:
                raise BadImageError(exc.marker.path, exc.marker.reason) from None
            return exc.marker, {"image_id": self.ids[index]}
        if isinstance(image, torch.Tensor):
            image = image.as_subclass(torch.Tensor)
        h, w = image.shape[-2:] if isinstance(image, torch.Tensor) else image.size[::-1]
        out: Target = {"image_id": target["image_id"]}
        boxes = target.get("boxes")
        out["boxes"] = (
            torch.zeros(0, 4) if boxes is None else boxes.as_subclass(torch.Tensor).float()
        )
        labels = target.get("labels")
        out["labels"] = torch.zeros(0, dtype=torch.int64) if labels is None else labels.long()
        if self.with_masks:
            masks = target.get("masks")
            out["masks"] = (
                torch.zeros(0, h, w, dtype=torch.uint8)
                if masks is None
                else masks.as_subclass(torch.Tensor).to(torch.uint8)
            )
        return image, out

    def __repr__(self) -> str:
        return (
            f"CocoDetectionSet({self.annotation_file}, images={len(self)}, train={self.train}, "
            f"missing={len(self.missing_images)}, dropped={len(self.dropped_images)})"
        )


def load_coco(
    root: str | Path,
    split: str = "train2017",
    *,
    train: bool,
    num_classes: int | None = None,
    with_masks: bool = True,
    skip_bad_images: bool = False,
    transforms: Callable | None = None,
) -> CocoDetectionSet:
    """A COCO detection split (torchvision ``CocoDetection`` wrapped for transforms v2).

    Item ``i`` is ``(image, target)``: ``image`` float32 ``[3, H, W]`` in [0, 1]; ``target``
    ``{"boxes": float32 [K, 4] (x1, y1, x2, y2) in pixels, "labels": int64 [K] (the COCO
    category ids, so a model needs ``num_classes = max id + 1``, 91 for COCO), "masks": uint8
    [K, H, W] (0/1; only with ``with_masks``), "image_id": int}``. Crowd annotations and boxes
    less than 1 px wide or high are left out of targets; ``K`` may be 0 (evaluation).

    Checked once, here: images listed but absent on disk are left out (a warning; listed in
    ``missing_images``); in training, images without a usable annotation are left out (listed
    in ``dropped_images``, as torchvision's detection references do).

    Args:
        root: the data root (``annotations/instances_{split}.json``, ``{split}/``).
        split: e.g. ``"train2017"``, ``"val2017"``.
        train: training (random horizontal flip; images without usable annotations dropped).
        num_classes: the model's classes including the background; every category id must be
            in ``1..num_classes-1``. ``None``: not checked (see ``num_classes_needed``).
        with_masks: also load instance masks (Mask R-CNN).
        skip_bad_images: unreadable files are dropped from their batch and counted (see
            :func:`detection_loader`) instead of raising :class:`BadImageError`.
        transforms: v2 transforms of ``(image, target)`` replacing the defaults
            (:func:`default_transforms`); they receive a PIL image and tv_tensors targets.

    Raises:
        CocoLayoutError: (a ``FileNotFoundError``) the annotation file or image folder is
            missing, or none of the listed images is on disk.
        ValueError: category ids outside ``1..num_classes-1`` (names them, their annotation
            count and ``num_classes``); ``num_classes`` not an integer >= 2; the annotation
            file lists no image; in training, no image has a usable annotation; with
            ``with_masks``, annotations without a segmentation.
        ImportError: pycocotools is not installed.
        BadImageError: (a ``ValueError``) when an item is read in the main process without
            ``skip_bad_images`` and its file cannot be decoded.
    """
    return CocoDetectionSet(
        root,
        split,
        train=train,
        num_classes=num_classes,
        with_masks=with_masks,
        skip_bad_images=skip_bad_images,
        transforms=transforms,
    )


Batch = tuple[list[torch.Tensor], list[Target], int]


def _split_bad(
    batch: list[tuple[torch.Tensor | BadImage, Target]],
) -> tuple[list[torch.Tensor], list[Target], tuple[tuple[str, str], ...]]:
    bad = tuple((x.path, x.reason) for x, _ in batch if isinstance(x, BadImage))
    good = [(x, t) for x, t in batch if not isinstance(x, BadImage)]
    return [x for x, _ in good], [t for _, t in good], bad


def collate_detection(batch: list[tuple[torch.Tensor | BadImage, Target]]) -> Batch:
    """DataLoader ``collate_fn`` for detection: images of different sizes stay a list.

    Returns:
        ``(images, targets, n_bad)``: the decoded images (each float32 ``[3, H_i, W_i]``),
        their targets, and the number of :class:`BadImage` markers dropped. This function
        never raises for them; :func:`detection_loader` raises or logs them by name.
    """
    images, targets, bad = _split_bad(batch)
    return images, targets, len(bad)


class DetectionLoader(DataLoader):
    """A ``DataLoader`` yielding :func:`collate_detection` batches that raises
    :class:`BadImageError` in this process for an unreadable image of its data set, or with
    the data set's ``skip_bad_images`` logs it, appends its path to ``bad_images`` (reset at
    the start of each pass) and drops it; a batch of unreadable images only is then left out
    (so ``len`` counts it), except under distributed sampling, where it raises (ranks must
    take the same number of steps)."""

    def __init__(self, dataset: Dataset, *, distributed: bool, **kwargs: Any) -> None:
        super().__init__(dataset, collate_fn=_split_bad, **kwargs)
        self.skip_bad_images = bool(getattr(dataset, "skip_bad_images", False))
        self.distributed = distributed
        self.bad_images: list[str] = []

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        self.bad_images = []
        return self._checked(super().__iter__())

    def _checked(self, batches: Iterator) -> Iterator[Batch]:
        for images, targets, bad in batches:
            for path, reason in bad:
                if not self.skip_bad_images:
                    raise BadImageError(path, reason)
                log.warning("skipping unreadable image %s (%s)", path, reason)
                self.bad_images.append(path)
            if not images:
                if self.distributed:
                    path, reason = bad[0]
                    raise BadImageError(
                        path,
                        reason,
                        message=f"all {len(bad)} images of a batch are unreadable (the first: "
                        f"{path}: {reason}); under distributed training a skipped step would "
                        f"stall the other ranks: remove or replace these files",
                    )
                continue
            yield images, targets, len(bad)


def detection_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    workers: int,
    seed: int = 0,
    distributed: bool = False,
    drop_last: bool = False,
) -> DetectionLoader:
    """A DataLoader of ``(images, targets, n_bad)`` batches (:func:`collate_detection`).

    Order: a ``DistributedSampler(shuffle=shuffle, seed=seed, drop_last=drop_last)`` when
    ``distributed`` and ``torch.distributed`` is initialized (call ``loader.sampler.set_epoch``
    each epoch); otherwise a ``RandomSampler`` with a generator seeded from ``seed`` when
    ``shuffle`` (a new order each pass, the same sequence of orders for a seed), else the data
    set's order. Workers are persistent and seeded from ``seed`` (their random flips repeat
    for a seed; with ``workers=0`` flips draw from the global torch RNG). Unreadable images:
    see :class:`DetectionLoader`.

    Raises:
        ValueError: ``batch_size < 1`` or ``workers < 0``.
        BadImageError: while iterating, for an unreadable image (see above).
    """
    for name, value, low in (("batch_size", batch_size, 1), ("workers", workers, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    sharded = distributed and dist.is_available() and dist.is_initialized()
    if sharded:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    elif shuffle:
        sampler = RandomSampler(dataset, generator=make_generator(seed, "order"))
    else:
        sampler = SequentialSampler(dataset)
    return DetectionLoader(
        dataset,
        distributed=sharded,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=make_generator(seed, "workers"),
    )
