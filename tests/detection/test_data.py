"""The synthetic COCO set and the COCO detection data: item shapes, boxes and masks against
hand-computed values and pycocotools, flips, the checks made at construction (missing files,
images without usable annotations, category ids, layout) and unreadable images."""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from cenet.data.badimage import SKIP_HINT, BadImage, BadImageError
from cenet.detection.data import (
    CocoLayoutError,
    coco_paths,
    collate_detection,
    detection_loader,
    load_coco,
)
from cenet.detection.synthetic import SHAPE_CATEGORIES, make_synthetic_coco

SIZE = 64


def _json(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def _rewrite(root: Path, split: str, edit) -> None:
    path = root / "annotations" / f"instances_{split}.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _one_rectangle(data: dict) -> None:
    """The first image gets one hand-made annotation: box (x 10, y 20, w 30, h 5)."""
    first = data["images"][0]["id"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != first]
    data["annotations"].append({
        "id": 999, "image_id": first, "category_id": 2, "bbox": [10.0, 20.0, 30.0, 5.0],
        "area": 150.0, "iscrowd": 0, "segmentation": [[10, 20, 40, 20, 40, 25, 10, 25]],
    })  # fmt: skip


# ---------------------------------------------------------------- synthetic set


def test_synthetic_layout_and_annotations(synthetic_coco):
    root = synthetic_coco
    for split, n in (("train2017", 8), ("val2017", 4)):
        data = _json(root, split)
        assert data["categories"] == SHAPE_CATEGORIES
        assert [c["name"] for c in data["categories"]] == ["rectangle", "ellipse", "triangle"]
        assert len(data["images"]) == n
        for img in data["images"]:
            with Image.open(root / split / img["file_name"]) as im:
                assert im.size == (SIZE, SIZE) and im.mode == "RGB"
        per_image = {img["id"]: [] for img in data["images"]}
        for ann in data["annotations"]:
            per_image[ann["image_id"]].append(ann)
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= SIZE and y + h <= SIZE
            assert w >= SIZE / 6 - 0.01 and h >= SIZE / 6 - 0.01
            (poly,) = ann["segmentation"]
            xs, ys = poly[0::2], poly[1::2]
            assert len(poly) == {1: 8, 2: 48, 3: 6}[ann["category_id"]]
            assert (x, y) == (min(xs), min(ys))
            assert x + w == pytest.approx(max(xs), abs=0.01)
            assert y + h == pytest.approx(max(ys), abs=0.01)
            assert ann["iscrowd"] == 0 and 0 < ann["area"] <= w * h + 0.01
            if ann["category_id"] == 1:  # a rectangle's area is w * h
                assert ann["area"] == pytest.approx(w * h, abs=0.01)
        assert all(1 <= len(anns) <= 3 for anns in per_image.values())
        for anns in per_image.values():  # shapes do not overlap
            for i, a in enumerate(anns):
                for b in anns[i + 1 :]:
                    ax, ay, aw, ah = a["bbox"]
                    bx, by, bw, bh = b["bbox"]
                    assert ax + aw < bx or bx + bw < ax or ay + ah < by or by + bh < ay
    ids = [a["id"] for s in ("train2017", "val2017") for a in _json(root, s)["annotations"]]
    assert len(ids) == len(set(ids))


def test_synthetic_shapes_stand_out_from_the_background(synthetic_coco):
    data = _json(synthetic_coco, "train2017")
    ds = load_coco(synthetic_coco, "train2017", train=False)
    for img in data["images"][:3]:
        pixels = np.asarray(Image.open(synthetic_coco / "train2017" / img["file_name"]), float)
        union = np.zeros((SIZE, SIZE), bool)
        for ann in ds.coco.imgToAnns[img["id"]]:
            union |= ds.coco.annToMask(ann).astype(bool)
        # the brightest channel of a shape is >= 160, the background's mean is <= 90 (+ noise)
        assert pixels[union].max(axis=1).mean() > pixels[~union].max(axis=1).mean() + 40


def test_synthetic_is_deterministic_for_a_seed(tmp_path):
    a = make_synthetic_coco(tmp_path / "a", num_train=3, num_val=2, seed=5)
    b = make_synthetic_coco(tmp_path / "b", num_train=3, num_val=2, seed=5)
    c = make_synthetic_coco(tmp_path / "c", num_train=3, num_val=2, seed=6)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 2 + 3 + 2
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert _json(a, "train2017") != _json(c, "train2017")
    # a split does not depend on the other split's size (annotation ids aside)
    d = make_synthetic_coco(tmp_path / "d", num_train=1, num_val=2, seed=5)
    for key in ("images", "categories"):
        assert _json(d, "val2017")[key] == _json(a, "val2017")[key]
    strip = [{k: v for k, v in x.items() if k != "id"} for x in _json(a, "val2017")["annotations"]]
    assert [
        {k: v for k, v in x.items() if k != "id"} for x in _json(d, "val2017")["annotations"]
    ] == strip
    assert (d / "val2017" / "000000100001.png").read_bytes() == (
        a / "val2017" / "000000100001.png"
    ).read_bytes()


@pytest.mark.parametrize(
    "kwargs", [{"num_train": -1}, {"image_size": 8}, {"max_objects": 0}, {"splits": "train"}]
)
def test_synthetic_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        make_synthetic_coco(tmp_path, **kwargs)


# ---------------------------------------------------------------- items


def test_item_shapes_dtypes_and_pycocotools_masks(synthetic_coco):
    ds = load_coco(synthetic_coco, "val2017", train=False)
    data = _json(synthetic_coco, "val2017")
    assert len(ds) == 4 and ds.ids == [img["id"] for img in data["images"]]
    assert ds.num_classes_needed == 4
    assert ds.category_names == {1: "rectangle", 2: "ellipse", 3: "triangle"}
    assert ds.missing_images == [] and ds.dropped_images == []
    for i in range(len(ds)):
        image, target = ds[i]
        anns = [a for a in data["annotations"] if a["image_id"] == ds.ids[i]]
        k = len(anns)
        assert type(image) is torch.Tensor and image.dtype == torch.float32
        assert image.shape == (3, SIZE, SIZE) and 0 <= image.min() and image.max() <= 1
        raw = np.array(Image.open(synthetic_coco / "val2017" / data["images"][i]["file_name"]))
        assert torch.allclose(image, torch.from_numpy(raw).permute(2, 0, 1).float() / 255)
        assert target["image_id"] == ds.ids[i]
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (k, 4)
        assert target["labels"].dtype == torch.int64
        assert target["labels"].tolist() == [a["category_id"] for a in anns]
        assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (k, SIZE, SIZE)
        for mask, ann in zip(target["masks"], anns, strict=True):
            assert torch.equal(mask, torch.from_numpy(ds.coco.annToMask(ann)))
            assert mask.sum() > 0.5 * ann["area"]  # a real shape, not an empty mask
        xywh = torch.tensor([a["bbox"] for a in anns])
        assert torch.allclose(target["boxes"][:, :2], xywh[:, :2])
        assert torch.allclose(target["boxes"][:, 2:], xywh[:, :2] + xywh[:, 2:])


def test_boxes_hand_checked_and_flipped(synthetic_coco_copy):
    _rewrite(synthetic_coco_copy, "train2017", _one_rectangle)
    ds = load_coco(synthetic_coco_copy, "train2017", train=False)
    image, target = ds[0]
    assert target["boxes"].tolist() == [[10.0, 20.0, 40.0, 25.0]]
    assert target["labels"].tolist() == [2]
    expected = torch.zeros(SIZE, SIZE, dtype=torch.uint8)
    expected[20:25, 10:40] = 1  # pycocotools fills the pixels whose centres are inside
    assert torch.equal(target["masks"][0], expected)

    always = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                         v2.RandomHorizontalFlip(1.0)])  # fmt: skip
    flipped = load_coco(synthetic_coco_copy, "train2017", train=False, transforms=always)
    f_image, f_target = flipped[0]
    assert f_target["boxes"].tolist() == [[64 - 40.0, 20.0, 64 - 10.0, 25.0]]
    assert torch.equal(f_target["masks"][0], expected.flip(-1))
    assert torch.equal(f_image, image.flip(-1))
    assert type(f_target["boxes"]) is torch.Tensor

    # training draws the flip with probability 0.5: both outcomes, each consistent
    train = load_coco(synthetic_coco_copy, "train2017", train=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(16):
        t_image, t_target = train[0]
        is_flipped = t_target["boxes"][0, 0].item() == 24.0
        assert t_target["boxes"].tolist() == (f_target if is_flipped else target)["boxes"].tolist()
        assert torch.equal(t_image, f_image if is_flipped else image)
        assert torch.equal(t_target["masks"], (f_target if is_flipped else target)["masks"])
        seen.add(is_flipped)
    assert seen == {False, True}


def test_without_masks(synthetic_coco):
    ds = load_coco(synthetic_coco, "val2017", train=False, with_masks=False)
    _, target = ds[0]
    assert set(target) == {"boxes", "labels", "image_id"}


# ---------------------------------------------------------------- checks at construction


def test_missing_image_is_dropped_and_counted(synthetic_coco_copy, caplog):
    data = _json(synthetic_coco_copy, "train2017")
    gone = data["images"][2]
    (synthetic_coco_copy / "train2017" / gone["file_name"]).unlink()
    with caplog.at_level(logging.WARNING, logger="cenet.detection.data"):
        ds = load_coco(synthetic_coco_copy, "train2017", train=True)
    assert ds.missing_images == [gone["file_name"]]
    assert len(ds) == 7 and gone["id"] not in ds.ids
    assert "1 of 8 images" in caplog.text and gone["file_name"] in caplog.text
    assert [ds[i][1]["image_id"] for i in range(len(ds))] == ds.ids


def test_no_image_on_disk_is_a_layout_error(synthetic_coco_copy):
    for path in (synthetic_coco_copy / "val2017").iterdir():
        path.unlink()
    with pytest.raises(CocoLayoutError, match="none of the 4 images listed") as info:
        load_coco(synthetic_coco_copy, "val2017", train=False)
    assert str(synthetic_coco_copy / "val2017") in str(info.value)


def test_images_without_usable_annotations_dropped_in_training_kept_in_eval(
    synthetic_coco_copy,
):
    images = _json(synthetic_coco_copy, "train2017")["images"]
    empty, crowd, tiny, mixed = (img["id"] for img in images[:4])

    def edit(data):
        anns = data["annotations"]
        data["annotations"] = [a for a in anns if a["image_id"] not in (empty, crowd, tiny)]
        for a in anns:
            if a["image_id"] == crowd:
                data["annotations"].append(dict(a, iscrowd=1))
            if a["image_id"] == tiny:
                x, y, w, _ = a["bbox"]
                data["annotations"].append(dict(a, bbox=[x, y, w, 0.5]))
            if a["image_id"] == mixed:
                x, y, _, h = a["bbox"]
                data["annotations"].append(dict(a, id=a["id"] + 10_000, bbox=[x, y, 0.9, h]))

    mixed_k = sum(
        a["image_id"] == mixed for a in _json(synthetic_coco_copy, "train2017")["annotations"]
    )
    _rewrite(synthetic_coco_copy, "train2017", edit)

    train = load_coco(synthetic_coco_copy, "train2017", train=True)
    names = {img["id"]: img["file_name"] for img in images}
    assert train.dropped_images == [names[empty], names[crowd], names[tiny]]
    assert len(train) == 5 and mixed in train.ids

    evaluation = load_coco(synthetic_coco_copy, "train2017", train=False)
    assert evaluation.dropped_images == [] and len(evaluation) == 8
    for image_id in (empty, crowd, tiny):
        _, target = evaluation[evaluation.ids.index(image_id)]
        assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
        assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
        assert target["masks"].shape == (0, SIZE, SIZE) and target["masks"].dtype == torch.uint8
    # the 0.9 px wide box is left out of the target, in training and in evaluation
    for ds in (train, evaluation):
        _, target = ds[ds.ids.index(mixed)]
        assert len(target["labels"]) == mixed_k and len(target["masks"]) == mixed_k
        widths = target["boxes"][:, 2] - target["boxes"][:, 0]
        assert (widths >= 1).all()


def test_category_id_beyond_num_classes_raises(synthetic_coco):
    anns = _json(synthetic_coco, "train2017")["annotations"]
    n3 = sum(a["category_id"] == 3 for a in anns)
    assert n3 > 0
    with pytest.raises(ValueError) as info:
        load_coco(synthetic_coco, "train2017", train=True, num_classes=3)
    msg = str(info.value)
    assert f"{n3} annotations have category ids 3 outside 1..2 (num_classes=3)" in msg
    assert "num_classes must be > the largest category id, here num_classes=4" in msg
    assert "instances_train2017.json" in msg
    assert len(load_coco(synthetic_coco, "train2017", train=True, num_classes=4)) == 8
    with pytest.raises(ValueError, match="num_classes must be None or an integer >= 2"):
        load_coco(synthetic_coco, "train2017", train=True, num_classes=1)


def test_category_id_zero_raises(synthetic_coco_copy):
    def edit(data):
        data["annotations"][0]["category_id"] = 0

    _rewrite(synthetic_coco_copy, "val2017", edit)
    with pytest.raises(ValueError, match=r"1 annotations have category ids 0 outside >= 1"):
        load_coco(synthetic_coco_copy, "val2017", train=False)


def test_missing_annotation_file_or_folder_is_a_layout_error(synthetic_coco, tmp_path):
    with pytest.raises(CocoLayoutError) as info:
        load_coco(synthetic_coco, "test2017", train=False)
    expected = synthetic_coco / "annotations" / "instances_test2017.json"
    assert isinstance(info.value, FileNotFoundError) and info.value.path == str(expected)
    assert f"COCO annotation file not found: {expected}" in str(info.value)
    assert f"{synthetic_coco}/test2017/" in str(info.value)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{}")
    with pytest.raises(CocoLayoutError, match="COCO image folder not found") as info:
        coco_paths(tmp_path, "val2017")
    assert info.value.path == str(tmp_path / "val2017")
    assert coco_paths(synthetic_coco, "val2017") == (
        synthetic_coco / "val2017",
        synthetic_coco / "annotations" / "instances_val2017.json",
    )


# ---------------------------------------------------------------- unreadable images, loader


@pytest.fixture
def corrupt(synthetic_coco_copy):
    """The third training image overwritten with text; returns (root, its path)."""
    name = _json(synthetic_coco_copy, "train2017")["images"][2]["file_name"]
    path = synthetic_coco_copy / "train2017" / name
    path.write_text("not an image\n")
    return synthetic_coco_copy, str(path)


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_raises_in_the_main_process(corrupt, workers):
    root, path = corrupt
    ds = load_coco(root, "train2017", train=False)
    loader = detection_loader(ds, batch_size=4, shuffle=False, workers=workers)
    with pytest.raises(BadImageError) as info:
        list(loader)
    err = info.value
    assert err.path == path and err.reason.startswith("UnidentifiedImageError")
    assert str(err) == f"cannot read image {path}: {err.reason}; {SKIP_HINT}"
    assert err.__cause__ is None and "worker" not in str(err).lower()
    del info, err, loader
    gc.collect()  # stop the persistent worker now


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_is_skipped_and_counted(corrupt, workers, caplog):
    root, path = corrupt
    ds = load_coco(root, "train2017", train=True, skip_bad_images=True)
    assert isinstance(ds[2][0], BadImage) and ds[2][1] == {"image_id": ds.ids[2]}
    # batch 1 holds only the bad image: left out; batch 2 also holds it beside others
    for batch_size, batches in ((1, 7), (3, 3)):
        loader = detection_loader(ds, batch_size=batch_size, shuffle=False, workers=workers)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cenet.detection.data"):
            out = list(loader)
        assert len(out) == batches
        assert sum(len(images) for images, _, _ in out) == 7
        assert sum(n_bad for _, _, n_bad in out) == (0 if batch_size == 1 else 1)
        ids = [t["image_id"] for _, targets, _ in out for t in targets]
        assert ids == [i for i in ds.ids if i != ds.ids[2]]
        assert loader.bad_images == [path] and f"skipping unreadable image {path}" in caplog.text
    del loader
    gc.collect()


def test_collate_detection_drops_and_counts_markers():
    a, b = torch.zeros(3, 4, 5), torch.ones(3, 6, 2)
    ta, tb = {"image_id": 1}, {"image_id": 3}
    batch = [(a, ta), (BadImage("x.jpg", "OSError: truncated"), {"image_id": 2}), (b, tb)]
    images, targets, n_bad = collate_detection(batch)
    assert images[0] is a and images[1] is b and targets == [ta, tb] and n_bad == 1
    assert collate_detection([(a, ta)]) == ([a], [ta], 0)


def test_loader_order_is_seeded(synthetic_coco):
    ds = load_coco(synthetic_coco, "train2017", train=False, with_masks=False)

    def order(**kwargs):
        loader = detection_loader(ds, batch_size=3, workers=0, **kwargs)
        assert loader.sampler.__class__.__name__ == (
            "RandomSampler" if kwargs["shuffle"] else "SequentialSampler"
        )
        return [[t["image_id"] for _, targets, _ in loader for t in targets] for _ in range(2)]

    assert order(shuffle=False) == [ds.ids, ds.ids]
    first, second = order(shuffle=True, seed=3)
    assert sorted(first) == sorted(ds.ids) and first != second  # a new order each pass
    assert order(shuffle=True, seed=3) == [first, second]
    assert order(shuffle=True, seed=4)[0] != first
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        detection_loader(ds, batch_size=0, shuffle=False, workers=0)
    with pytest.raises(ValueError, match="workers must be an integer >= 0, got -1"):
        detection_loader(ds, batch_size=1, shuffle=False, workers=-1)
