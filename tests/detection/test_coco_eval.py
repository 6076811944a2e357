"""COCO evaluation: torchvision outputs to COCO results, and COCOeval's AP for predictions whose
AP is known by hand (the ground truth itself, boxes shifted to a known IoU, false positives
ranked first, no predictions)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from torchvision.ops import box_iou

from cenet.detection.coco_eval import (
    BOX_METRICS,
    evaluate_coco,
    format_table,
    predictions_to_coco,
)


@pytest.fixture(scope="module")
def gt(synthetic_coco):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(synthetic_coco / "annotations" / "instances_val2017.json"))


def _outputs(coco, *, shift=0.0, masks=True):
    """torchvision-style outputs from the ground truth: every annotation a detection of score 1,
    its box moved right by ``shift`` times its width."""
    outputs, ids = [], []
    for image_id in coco.getImgIds():
        anns = coco.imgToAnns[image_id]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
        xywh[:, 0] += shift * xywh[:, 2]
        out = {
            "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
            "scores": torch.ones(len(anns)),
            "labels": torch.tensor([a["category_id"] for a in anns]),
        }
        if masks:
            out["masks"] = torch.stack([torch.from_numpy(coco.annToMask(a)).float() for a in anns])[
                :, None
            ]
        outputs.append(out)
        ids.append(image_id)
    return outputs, ids


def test_all_objects_are_small(gt):
    # so APs = AP, and APm, APl have no ground truth (COCOeval's -1, reported as NaN)
    assert all(a["area"] < 32**2 for a in gt.dataset["annotations"])


def test_ground_truth_as_predictions_scores_one(gt):
    results = predictions_to_coco(*_outputs(gt))
    assert len(results) == len(gt.dataset["annotations"])
    json.dumps(results)  # serializable: RLE counts are str
    metrics = evaluate_coco(gt, results)
    assert set(metrics) == {"bbox", "segm"}
    for kind in ("bbox", "segm"):
        assert list(metrics[kind]) == list(BOX_METRICS)
        assert [metrics[kind][k] for k in ("AP", "AP50", "AP75", "APs")] == [1.0] * 4
        assert math.isnan(metrics[kind]["APm"]) and math.isnan(metrics[kind]["APl"])


def test_shifted_boxes_lose_ap_as_predicted_by_their_iou(gt):
    # a box moved right by s of its width w has IoU (w - s) / (w + s) with its ground truth
    iou = 0.62
    shift = (1 - iou) / (1 + iou)
    outputs, ids = _outputs(gt, shift=shift, masks=False)
    truth, _ = _outputs(gt, masks=False)
    assert torch.allclose(box_iou(outputs[0]["boxes"], truth[0]["boxes"]).diag(),
                          torch.full((len(truth[0]["boxes"]),), iou))  # fmt: skip
    box = evaluate_coco(gt, predictions_to_coco(outputs, ids), iou_types=("bbox",))["bbox"]
    # matched at IoU thresholds 0.50, 0.55, 0.60 of the ten 0.50:0.05:0.95
    assert box["AP50"] == 1.0 and box["AP75"] == 0.0
    assert box["AP"] == pytest.approx(0.3, abs=1e-12) and box["APs"] == box["AP"]

    outputs, ids = _outputs(gt, shift=0.5, masks=False)  # IoU 1/3 < 0.5: all missed
    box = evaluate_coco(gt, predictions_to_coco(outputs, ids), iou_types=("bbox",))["bbox"]
    assert (box["AP"], box["AP50"], box["AP75"]) == (0.0, 0.0, 0.0)


def test_false_positives_ranked_first_halve_ap(gt):
    # per category n objects: n unmatched boxes of score 1, then the n true ones of score 0.5;
    # precision rises to n / 2n at full recall, so interpolated precision is 1/2 everywhere
    outputs, ids = _outputs(gt, masks=False)
    for out in outputs:
        k = len(out["labels"])
        out["boxes"] = torch.cat([torch.tensor([[0.0, 0.0, 2.0, 2.0]]).repeat(k, 1), out["boxes"]])
        out["scores"] = torch.cat([torch.ones(k), torch.full((k,), 0.5)])
        out["labels"] = out["labels"].repeat(2)
    box = evaluate_coco(gt, predictions_to_coco(outputs, ids), iou_types=("bbox",))["bbox"]
    assert box["AP"] == box["AP50"] == box["AP75"] == pytest.approx(0.5, abs=1e-12)


def test_no_predictions_score_zero(gt):
    metrics = evaluate_coco(gt, [])
    for kind in ("bbox", "segm"):
        assert [metrics[kind][k] for k in ("AP", "AP50", "AP75", "APs")] == [0.0] * 4
        assert math.isnan(metrics[kind]["APm"])


def test_image_ids_restrict_the_evaluation_and_results_are_not_modified(gt):
    outputs, ids = _outputs(gt)
    results = predictions_to_coco(outputs[:2], ids[:2])
    before = copy.deepcopy(results)
    assert evaluate_coco(gt, results, image_ids=ids[:2])["segm"]["AP"] == 1.0
    assert results == before
    # the other images' objects are missed when every image is evaluated
    assert evaluate_coco(gt, results, iou_types=("bbox",))["bbox"]["AP50"] < 1.0


def test_predictions_to_coco_by_hand():
    probs = torch.full((2, 1, 4, 5), 0.4)
    probs[0, 0, 1:3, 2:5] = 0.6  # instance 0: rows 1-2, columns 2-4
    out = {
        "boxes": torch.tensor([[10.0, 20.0, 40.0, 25.0], [0.5, 1.0, 2.0, 4.0]]),
        "scores": torch.tensor([0.9, 0.25]),
        "labels": torch.tensor([3, 1]),
        "masks": probs,
    }
    results = predictions_to_coco([out], [42])
    assert [(r["image_id"], r["category_id"], r["bbox"]) for r in results] == [
        (42, 3, [10.0, 20.0, 30.0, 5.0]),
        (42, 1, [0.5, 1.0, 1.5, 3.0]),
    ]
    assert [r["score"] for r in results] == pytest.approx([0.9, 0.25])
    first = results[0]["segmentation"]
    assert first["size"] == [4, 5] and isinstance(first["counts"], str)
    expected = np.zeros((4, 5), np.uint8)
    expected[1:3, 2:5] = 1
    assert np.array_equal(mask_util.decode(first), expected)
    assert mask_util.decode(results[1]["segmentation"]).sum() == 0
    # a lower threshold takes the 0.4 pixels too; [K, H, W] masks are accepted
    low = predictions_to_coco([dict(out, masks=probs[:, 0])], [42], mask_threshold=0.3)
    assert mask_util.decode(low[1]["segmentation"]).sum() == 20
    boxes_only = predictions_to_coco([{k: out[k] for k in ("boxes", "scores", "labels")}], [7])
    assert all("segmentation" not in r for r in boxes_only)


def test_bad_inputs_raise(gt):
    out = {"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.ones(1)}
    with pytest.raises(ValueError, match="same length.*1 outputs and 2 image ids"):
        predictions_to_coco([out], [1, 2])
    with pytest.raises(ValueError, match=r"output 0 has no \['labels'\]"):
        predictions_to_coco([{"boxes": out["boxes"], "scores": out["scores"]}], [1])
    with pytest.raises(ValueError, match="masks must be"):
        predictions_to_coco([dict(out, masks=torch.zeros(2, 1, 3, 3))], [1])
    image_id = gt.getImgIds()[0]
    boxes = predictions_to_coco([out], [image_id])
    with pytest.raises(ValueError, match=r"iou_types=\('bbox',\)"):
        evaluate_coco(gt, boxes)
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate_coco(gt, predictions_to_coco([out], [123456789]), iou_types=("bbox",))
    with pytest.raises(ValueError, match="iou_types must be"):
        evaluate_coco(gt, boxes, iou_types=("keypoints",))


def test_format_table():
    metrics = {
        "bbox": {"AP": 0.41234, "AP50": 0.6, "AP75": 0.44951},
        "segm": {"AP": 0.3706, "AP50": 0.58, "AP75": float("nan")},
    }
    assert format_table(metrics) == (
        "| box AP | AP50 | AP75 | mask AP | AP50 | AP75 |\n"
        "| ---: | ---: | ---: | ---: | ---: | ---: |\n"
        "| 41.2 | 60.0 | 45.0 | 37.1 | 58.0 | n/a |"
    )
    boxes = format_table({"bbox": metrics["bbox"]}, name="CE-R50")
    assert boxes.splitlines()[0].startswith("| model | box AP |")
    assert boxes.splitlines()[2] == "| CE-R50 | 41.2 | 60.0 | 45.0 | n/a | n/a | n/a |"


def test_mask_evaluation_leaves_the_ground_truth_polygons(gt):
    """pycocotools' mask COCOeval turns ground-truth polygons into RLEs in place; a data set
    reading its masks from the same COCO object would then fail: evaluate_coco must not."""
    before = copy.deepcopy(gt.dataset["annotations"])
    outputs, ids = _outputs(gt)
    for _ in range(2):
        metrics = evaluate_coco(gt, predictions_to_coco(outputs, ids))
        assert metrics["segm"]["AP"] == pytest.approx(1.0)
    assert gt.dataset["annotations"] == before
    assert all(isinstance(a["segmentation"], list) for a in gt.anns.values())
