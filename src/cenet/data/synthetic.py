"""A synthetic ImageFolder of JPEGs, for smoke tests of recipes and loader benchmarks.

Each class gets its own mean color plus per-image noise, so a network can learn the classes
and JPEG decoding costs what a photograph of the same size costs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def make_image_folder(
    root: str | os.PathLike[str],
    *,
    num_classes: int = 4,
    train_per_class: int = 8,
    val_per_class: int = 2,
    size: int | tuple[int, int] = 64,
    seed: int = 0,
    quality: int = 90,
) -> Path:
    """Write ``root/train/<class>/<i>.jpg`` and ``root/val/<class>/<i>.jpg``.

    Args:
        root: directory to create (may exist; files are overwritten).
        num_classes: classes ``class_000, class_001, ...``, >= 1.
        train_per_class, val_per_class: images per class in each split, >= 1.
        size: image side in pixels, or ``(width, height)``.
        seed: the images are a pure function of the arguments.
        quality: JPEG quality, 1..95.

    Returns:
        ``Path(root)``.

    Raises:
        ValueError: for a count, size or quality out of range.
    """
    width, height = (size, size) if isinstance(size, int) else size
    for name, value, low in (
        ("num_classes", num_classes, 1),
        ("train_per_class", train_per_class, 1),
        ("val_per_class", val_per_class, 1),
        ("width", width, 1),
        ("height", height, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not 1 <= quality <= 95:
        raise ValueError(f"quality must be in 1..95, got {quality}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    means = rng.integers(40, 216, size=(num_classes, 3))
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(num_classes):
            folder = root / split / f"class_{label:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                noise = rng.normal(0.0, 30.0, size=(height, width, 3))
                pixels = np.clip(means[label] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels, "RGB").save(folder / f"{i:05d}.jpg", quality=quality)
    return root
