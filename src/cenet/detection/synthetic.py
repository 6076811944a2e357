"""A tiny synthetic detection set in the COCO 2017 layout: filled rectangles, ellipses and
triangles on a noisy background, with boxes, polygons and areas, for tests and for a small
Mask R-CNN experiment that must run without the real COCO."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

SHAPE_CATEGORIES: list[dict] = [
    {"id": 1, "name": "rectangle", "supercategory": "shape"},
    {"id": 2, "name": "ellipse", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
"""The COCO ``categories`` of :func:`make_synthetic_coco` (ids 1..3, so ``num_classes = 4``)."""

ELLIPSE_POINTS = 24
"""Vertices of an ellipse's polygon (every 15 degrees, so its extents are the ellipse's box)."""

_PLACEMENT_TRIES = 100


def _polygon(category_id: int, x: float, y: float, w: float, h: float, rng) -> list[float]:
    """Vertices ``[x1, y1, x2, y2, ...]`` of a shape whose extents are exactly ``(x, y, w, h)``."""
    if category_id == 1:
        pts = [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
    elif category_id == 2:
        cx, cy, rx, ry = x + w / 2, y + h / 2, w / 2, h / 2
        pts = [
            (
                cx + rx * math.cos(2 * math.pi * k / ELLIPSE_POINTS),
                cy + ry * math.sin(2 * math.pi * k / ELLIPSE_POINTS),
            )
            for k in range(ELLIPSE_POINTS)
        ]
    else:
        apex = x + float(rng.uniform(0.2, 0.8)) * w
        pts = [(x, y + h), (x + w, y + h), (apex, y)]
    return [round(c, 2) for p in pts for c in p]


def _shoelace(poly: list[float]) -> float:
    xs, ys = np.asarray(poly[0::2]), np.asarray(poly[1::2])
    return float(abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))) / 2)


def _overlaps(box: tuple[float, float, float, float], others: list[tuple]) -> bool:
    x, y, w, h = box
    m = 2.0  # pixels kept free between shapes
    return any(
        x < ox + ow + m and ox < x + w + m and y < oy + oh + m and oy < y + h + m
        for ox, oy, ow, oh in others
    )


def _make_image(rng, size: int, max_objects: int) -> tuple[Image.Image, list[tuple[int, list]]]:
    """One image and its ``(category_id, polygon)`` list (shapes do not overlap)."""
    grey = float(rng.uniform(20, 90))
    noise = rng.normal(0.0, 8.0, size=(size, size, 3))
    pixels = np.clip(grey + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, mode="RGB")
    draw = ImageDraw.Draw(image)
    lo, hi = size / 6, size / 2.5
    boxes: list[tuple] = []
    shapes: list[tuple[int, list]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _ in range(_PLACEMENT_TRIES):
            w, h = (float(v) for v in rng.uniform(lo, hi, size=2))
            x = float(rng.uniform(1, size - 1 - w))
            y = float(rng.uniform(1, size - 1 - h))
            box = (round(x, 2), round(y, 2), round(w, 2), round(h, 2))
            if not _overlaps(box, boxes):
                break
        else:
            continue  # no free room for this shape: the image gets fewer
        category_id = int(rng.integers(1, len(SHAPE_CATEGORIES) + 1))
        poly = _polygon(category_id, *box, rng)
        # a bright colour (one channel >= 160) on the darker background
        colour = rng.integers(0, 256, size=3)
        colour[int(rng.integers(0, 3))] = int(rng.integers(160, 256))
        draw.polygon(poly, fill=tuple(int(c) for c in colour))
        boxes.append(box)
        shapes.append((category_id, poly))
    return image, shapes


def make_synthetic_coco(
    root: str | Path,
    *,
    num_train: int = 8,
    num_val: int = 4,
    image_size: int = 64,
    max_objects: int = 3,
    seed: int = 0,
    splits: Sequence[str] = ("train2017", "val2017"),
) -> Path:
    """Write a synthetic detection set in the COCO 2017 layout under ``root``.

    Layout: ``annotations/instances_{split}.json`` and ``{split}/{image_id:012d}.png`` for each
    split. The first split gets ``num_train`` images, the others ``num_val`` each. Every image
    is ``image_size`` x ``image_size`` RGB: a noisy grey background and 1..``max_objects``
    non-overlapping filled shapes of :data:`SHAPE_CATEGORIES` (rectangle, ellipse as a
    24-point polygon, triangle), each of a random bright colour, position and size (each side
    between 1/6 and 1/2.5 of ``image_size``). Each shape is one annotation: ``bbox`` ``[x, y,
    w, h]`` in pixels (float, the polygon's extents), ``area`` (the polygon's area, px^2),
    ``iscrowd`` 0, ``segmentation`` ``[[x1, y1, x2, y2, ...]]``, ``category_id``, ``id``,
    ``image_id``. Image ids are ``100000 * split_index + 1, 2, ...``; annotation ids are
    unique over all splits. The output depends only on the arguments (``seed`` and each
    split's position), not on the other splits' sizes.

    Args:
        root: output directory (created; existing files of the same names are overwritten).
        num_train, num_val: images per split, >= 0.
        image_size: image side in pixels, >= 16.
        max_objects: most shapes per image, >= 1 (fewer when they do not fit).
        seed: random seed.
        splits: split names, e.g. ``("train2017", "val2017")``; at least one, distinct.

    Returns:
        ``Path(root)``.

    Raises:
        ValueError: an argument outside the ranges above.
    """
    for name, value, low in (
        ("num_train", num_train, 0),
        ("num_val", num_val, 0),
        ("image_size", image_size, 16),
        ("max_objects", max_objects, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if isinstance(splits, str) or not splits or len(set(splits)) != len(splits):
        raise ValueError(
            f"splits must be a non-empty sequence of distinct names such as "
            f"('train2017', 'val2017'), got {splits!r}"
        )
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ann_id = 1
    for index, split in enumerate(splits):
        rng = np.random.default_rng([seed, index])
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(num_train if index == 0 else num_val):
            image_id = 100000 * index + i + 1
            file_name = f"{image_id:012d}.png"
            image, shapes = _make_image(rng, image_size, max_objects)
            image.save(folder / file_name)
            images.append(
                {"id": image_id, "file_name": file_name, "height": image_size, "width": image_size}
            )
            for category_id, poly in shapes:
                xs, ys = poly[0::2], poly[1::2]
                x, y = min(xs), min(ys)
                annotations.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": category_id,
                        "bbox": [x, y, round(max(xs) - x, 2), round(max(ys) - y, 2)],
                        "area": round(_shoelace(poly), 2),
                        "iscrowd": 0,
                        "segmentation": [poly],
                    }
                )
                ann_id += 1
        dataset = {
            "info": {"description": f"cenet synthetic shapes, seed {seed}", "version": "1.0"},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": SHAPE_CATEGORIES,
        }
        path = root / "annotations" / f"instances_{split}.json"
        path.write_text(json.dumps(dataset))
        log.debug("wrote %s: %d images, %d annotations", path, len(images), len(annotations))
    return root
