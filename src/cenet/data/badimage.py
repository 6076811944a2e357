"""Unreadable images: decode errors are caught where the file is read (a DataLoader worker),
travel to the main process as :class:`BadImage` markers beside the batch, and are raised there
as :class:`BadImageError` naming the file, or skipped and counted (``skip_bad_images``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import default_collate

SKIP_HINT = "pass --skip-bad-images (config skip_bad_images: true) to skip such files"


class BadImageError(ValueError):
    """An image file that cannot be read or decoded.

    Attributes:
        path: the file.
        reason: what went wrong, e.g. ``"UnidentifiedImageError: cannot identify image file
            ..."`` or ``"OSError: image file is truncated ..."``.
    """

    def __init__(self, path: str, reason: str, message: str | None = None) -> None:
        self.path = path
        self.reason = reason
        super().__init__(message or f"cannot read image {path}: {reason}; {SKIP_HINT}")

    def __reduce__(self) -> tuple[type[BadImageError], tuple[str, str, str]]:
        return type(self), (self.path, self.reason, str(self))


@dataclass(frozen=True)
class BadImage:
    """What a data set returns in place of an image it could not decode."""

    path: str
    reason: str


def open_rgb(path: str) -> Image.Image | BadImage:
    """Open and fully decode an image file as RGB (grayscale, palette and RGBA converted, alpha
    dropped), or return a :class:`BadImage` naming the file and the error.

    Never raises for a bad file: a missing, empty, truncated or foreign file, a decompression
    bomb (``PIL.Image.DecompressionBombError``) or any other decode error becomes a marker.
    """
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as exc:  # any failure to decode this one file is a property of the file
        return BadImage(str(path), f"{type(exc).__name__}: {exc}")


class BatchCollate:
    """DataLoader ``collate_fn`` for ``(image or BadImage, label)`` items.

    Returns ``(images float32 [B, C, H, W] or None, labels int64 [B] or None, bad)`` where
    ``B`` counts the decoded items, ``bad`` is a tuple of ``(path, reason)`` of the markers,
    and ``None`` stands for a batch in which every item was bad. ``channels_last`` converts the
    images in the worker (so a pinned batch stays pinned).
    """

    def __init__(self, channels_last: bool = False) -> None:
        self.channels_last = channels_last

    def __call__(
        self, items: list[tuple[torch.Tensor | BadImage, int]]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, tuple[tuple[str, str], ...]]:
        bad = tuple((x.path, x.reason) for x, _ in items if isinstance(x, BadImage))
        good = [item for item in items if not isinstance(item[0], BadImage)]
        if not good:
            return None, None, bad
        images, labels = default_collate(good)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels, bad
