"""COCO evaluation of torchvision detection outputs with ``pycocotools.cocoeval.COCOeval``:
:func:`predictions_to_coco`, :func:`evaluate_coco` and :func:`format_table` (the paper's
Table 5 columns)."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .data import require_pycocotools

log = logging.getLogger(__name__)

BOX_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
"""Names of the first six ``COCOeval.stats``: AP at IoU 0.50:0.95, at 0.50, at 0.75, and at
0.50:0.95 for small (< 32^2 px^2), medium and large (> 96^2 px^2) objects."""

IOU_TYPES = ("bbox", "segm")


def predictions_to_coco(
    outputs: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int],
    *,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """torchvision detection outputs -> COCO result dicts (JSON-serializable).

    Args:
        outputs: one dict per image, as a torchvision detection model returns in eval mode:
            ``boxes`` float ``[K, 4]`` (x1, y1, x2, y2) in pixels of the original image,
            ``scores`` float ``[K]``, ``labels`` int ``[K]`` (COCO category ids), optional
            ``masks`` float ``[K, 1, H, W]`` (or ``[K, H, W]``) probabilities in [0, 1].
        image_ids: the COCO image id of each output, same length.
        mask_threshold: a mask pixel is in the instance when its probability is > this.

    Returns:
        One dict per detection: ``image_id``, ``category_id`` (int), ``bbox`` ``[x, y, w, h]``
        (floats, pixels), ``score`` (float), and with masks ``segmentation``: an RLE
        (``pycocotools.mask.encode``) ``{"size": [H, W], "counts": str}``.

    Raises:
        ValueError: ``len(outputs) != len(image_ids)``, a missing key, shapes that disagree,
            or ``mask_threshold`` outside [0, 1).
        ImportError: masks given and pycocotools not installed.
    """
    if len(outputs) != len(image_ids):
        raise ValueError(
            f"outputs and image_ids must have the same length (one image id per output), got "
            f"{len(outputs)} outputs and {len(image_ids)} image ids"
        )
    if not 0.0 <= mask_threshold < 1.0:
        raise ValueError(f"mask_threshold must be in [0, 1), got {mask_threshold!r}")
    results: list[dict[str, Any]] = []
    for n, (out, image_id) in enumerate(zip(outputs, image_ids, strict=True)):
        missing = [k for k in ("boxes", "scores", "labels") if k not in out]
        if missing:
            raise ValueError(
                f"output {n} has no {missing}: each output needs boxes [K, 4], scores [K] and "
                f"labels [K] (torchvision detection models in eval mode), got keys {list(out)}"
            )
        boxes = out["boxes"].detach().float().cpu()
        scores = out["scores"].detach().float().cpu()
        labels = out["labels"].detach().cpu()
        k = boxes.shape[0]
        if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != (k,) or labels.shape != (k,):
            raise ValueError(
                f"output {n}: expected boxes [K, 4], scores [K], labels [K], got "
                f"{tuple(boxes.shape)}, {tuple(scores.shape)}, {tuple(labels.shape)}"
            )
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        rles = _encode_masks(out["masks"], k, mask_threshold, n) if "masks" in out else None
        for j in range(k):
            result = {
                "image_id": int(image_id),
                "category_id": int(labels[j]),
                "bbox": xywh[j],
                "score": float(scores[j]),
            }
            if rles is not None:
                result["segmentation"] = rles[j]
            results.append(result)
    return results


def _encode_masks(masks: torch.Tensor, k: int, threshold: float, n: int) -> list[dict]:
    require_pycocotools()
    from pycocotools import mask as mask_util

    masks = masks.detach().cpu()
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3 or masks.shape[0] != k:
        raise ValueError(
            f"output {n}: masks must be [K, 1, H, W] or [K, H, W] with K = {k} (the number of "
            f"boxes), got {tuple(masks.shape)}"
        )
    binary = (masks.float() > threshold).numpy().astype(np.uint8)
    rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def _empty_results(coco_gt):
    """A result ``COCO`` object without detections (``loadRes`` fails on an empty list)."""
    from pycocotools.coco import COCO

    res = COCO()
    res.dataset = {
        "images": list(coco_gt.dataset.get("images", [])),
        "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    res.createIndex()
    return res


def _private_copy(coco_gt, buffer: io.StringIO):
    """A ``COCO`` object over copies of ``coco_gt``'s annotation dicts: mask COCOeval replaces
    each ground-truth polygon by an RLE in place (pycocotools' ``_toMask``), which a data set
    reading its masks from the same object could not decode afterwards."""
    from pycocotools.coco import COCO

    gt = COCO()
    gt.dataset = {**coco_gt.dataset,
                  "annotations": [dict(a) for a in coco_gt.dataset.get("annotations", [])]}
    with contextlib.redirect_stdout(buffer):  # createIndex prints
        gt.createIndex()
    return gt


def evaluate_coco(
    coco_gt,
    results: Sequence[Mapping[str, Any]],
    *,
    iou_types: Sequence[str] = IOU_TYPES,
    image_ids: Sequence[int] | None = None,
) -> dict[str, dict[str, float]]:
    """COCO AP of ``results`` against ``coco_gt`` (``pycocotools.cocoeval.COCOeval``).

    Args:
        coco_gt: a ``pycocotools.coco.COCO`` ground truth (e.g. ``load_coco(...).coco``).
        results: COCO result dicts (:func:`predictions_to_coco`); neither they nor
            ``coco_gt`` are modified. May be empty
            (a model that detected nothing): every AP is then 0 (or NaN, see below).
        iou_types: ``"bbox"`` and/or ``"segm"`` (``"segm"`` needs a ``segmentation`` in every
            result).
        image_ids: the images evaluated (those the model ran on); ``None``: every image of
            ``coco_gt`` (an image without results then counts as missed objects).

    Returns:
        ``{iou_type: {name: value}}`` with the names of :data:`BOX_METRICS`; values are
        fractions in [0, 1], or NaN where COCOeval has nothing to measure (its -1: no
        ground-truth object of that size range, e.g. ``APl`` on small images). pycocotools'
        printed summary goes to this module's logger at DEBUG level.

    Raises:
        ValueError: an unknown or empty ``iou_types``; ``"segm"`` with results lacking
            ``segmentation`` (evaluate ``iou_types=("bbox",)`` for a box-only model);
            results or ``image_ids`` naming images not in ``coco_gt``.
        ImportError: pycocotools is not installed.
    """
    require_pycocotools()
    from pycocotools.cocoeval import COCOeval

    iou_types = tuple(iou_types)
    if not iou_types or any(t not in IOU_TYPES for t in iou_types):
        raise ValueError(f"iou_types must be a non-empty subset of {IOU_TYPES}, got {iou_types}")
    if "segm" in iou_types and any("segmentation" not in r for r in results):
        raise ValueError(
            "iou_types includes 'segm' but some results have no 'segmentation' (a box-only "
            "model such as Faster R-CNN): evaluate with iou_types=('bbox',)"
        )
    known = set(coco_gt.getImgIds())
    for what, ids in (("results", {r["image_id"] for r in results}), ("image_ids", image_ids)):
        unknown = sorted(set(ids or ()) - known)
        if unknown:
            raise ValueError(
                f"{what} name {len(unknown)} image ids not in the ground truth (the first: "
                f"{unknown[:5]}); evaluate against the annotation file of the images predicted"
            )
    metrics: dict[str, dict[str, float]] = {}
    buffer = io.StringIO()
    if "segm" in iou_types:
        coco_gt = _private_copy(coco_gt, buffer)
    with contextlib.redirect_stdout(buffer):
        # loadRes adds keys to the dicts it is given: hand it copies
        coco_dt = (
            coco_gt.loadRes([dict(r) for r in results]) if results else _empty_results(coco_gt)
        )
    for iou_type in iou_types:
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(set(image_ids))
        with contextlib.redirect_stdout(buffer):
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        log.debug("COCOeval %s:\n%s", iou_type, buffer.getvalue().rstrip())
        buffer = io.StringIO()
        metrics[iou_type] = {
            name: float(v) if v >= 0 else math.nan
            for name, v in zip(BOX_METRICS, evaluator.stats[: len(BOX_METRICS)], strict=True)
        }
    return metrics


def _percent(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{100 * value:.1f}"


def format_table(metrics: Mapping[str, Mapping[str, float]], *, name: str | None = None) -> str:
    """A Markdown table in the paper's Table 5 columns: box AP, AP50, AP75, mask AP, AP50,
    AP75, as percentages with one decimal (``"n/a"`` for a missing or NaN value, e.g. the
    mask columns of a box-only model).

    Args:
        metrics: :func:`evaluate_coco`'s result (``"bbox"`` and/or ``"segm"``).
        name: a first column ``model`` with this name (e.g. ``"CE-ResNet-50"``).

    Returns:
        Three lines (header, alignment, values) joined by newlines, without a trailing one.
    """
    cols = [
        ("bbox", "box AP"),
        ("bbox", "AP50"),
        ("bbox", "AP75"),
        ("segm", "mask AP"),
        ("segm", "AP50"),
        ("segm", "AP75"),
    ]
    header = [title for _, title in cols]
    cells = [_percent(metrics.get(kind, {}).get(title.split()[-1])) for kind, title in cols]
    aligns = ["---:"] * len(cols)
    if name is not None:
        header, cells, aligns = ["model", *header], [name, *cells], [":---", *aligns]
    return "\n".join("| " + " | ".join(row) + " |" for row in (header, aligns, cells))
