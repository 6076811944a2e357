"""Unreadable images in an ImageFolder tree: an empty file, a truncated JPEG and a text file
named .jpg raise BadImageError naming the file in the main process (also with a worker), or
are skipped, logged and counted with skip_bad_images."""

from __future__ import annotations

import gc
import logging
import pickle

import pytest
import torch

from cenet.data import BadImageError, build_loaders
from cenet.data.badimage import SKIP_HINT, BatchCollate, open_rgb
from cenet.data.folder import FolderLoader, folder_transform, infer_image_size
from cenet.data.synthetic import make_image_folder


def _spoil(root):
    """Make three training images unreadable; returns their paths, as strings."""
    empty = root / "train" / "class_000" / "00001.jpg"
    truncated = root / "train" / "class_001" / "00002.jpg"
    text = root / "train" / "class_002" / "00003.jpg"
    empty.write_bytes(b"")
    truncated.write_bytes(truncated.read_bytes()[:300])
    text.write_text("not an image\n")
    return [str(empty), str(truncated), str(text)]


@pytest.fixture
def spoiled(tmp_path):
    root = make_image_folder(tmp_path / "jpegs", num_classes=3, train_per_class=6, size=24)
    return root, _spoil(root)


def test_each_kind_of_bad_file_is_a_marker_naming_it(spoiled):
    _, bad = spoiled
    reasons = [open_rgb(path) for path in bad]
    assert [m.path for m in reasons] == bad
    assert reasons[0].reason.startswith("UnidentifiedImageError: cannot identify image file")
    assert "truncated" in reasons[1].reason.lower() and reasons[1].reason.startswith("OSError")
    assert reasons[2].reason.startswith("UnidentifiedImageError")


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_image_raises_in_the_main_process_naming_the_file(spoiled, workers):
    root, bad = spoiled
    train, _, _ = build_loaders(
        dataset="folder", data=root, batch_size=18, image_size=16, num_workers=workers
    )
    with pytest.raises(BadImageError) as info:
        list(train)
    err = info.value
    assert isinstance(err, ValueError) and err.path in bad and err.reason in str(err)
    assert str(err) == f"cannot read image {err.path}: {err.reason}; {SKIP_HINT}"
    assert "pass --skip-bad-images (config skip_bad_images: true)" in str(err)
    # raised here, not re-raised from a worker: no worker traceback, no chained cause
    assert err.__cause__ is None and "Traceback" not in str(err)
    assert "worker" not in str(err).lower()
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.path, copy.reason, str(copy)) == (err.path, err.reason, str(err))
    # Stop the persistent worker now: left to a later garbage collection, its shutdown can
    # run inside an import (PIL loads its plugins lazily) and wait 5 s for the worker to join.
    del info, err, train
    gc.collect()


@pytest.mark.parametrize("workers", [0, 2])
def test_skipped_images_are_logged_and_counted_per_epoch(spoiled, workers, caplog):
    root, bad = spoiled
    train, test, info = build_loaders(
        dataset="folder", data=root, batch_size=6, image_size=16, num_workers=workers,
        skip_bad_images=True,
    )  # fmt: skip
    for epoch in (0, 1):
        caplog.clear()
        train.set_epoch(epoch)
        assert train.bad_images == []
        with caplog.at_level(logging.WARNING, logger="cenet.data"):
            sizes = [y.numel() for _, y in train]
        assert sorted(train.bad_images) == sorted(bad)  # each once per epoch
        assert sum(sizes) == info.num_train - 3 and len(sizes) == len(train) == 3
        warned = [r for r in caplog.records if r.name.startswith("cenet.data")]
        assert len(warned) == 3 and all(r.levelno == logging.WARNING for r in warned)
        assert sorted(p for p in bad if any(p in r.getMessage() for r in warned)) == sorted(bad)
    train.set_epoch(2)
    assert train.bad_images == []  # reset by set_epoch
    assert sum(y.numel() for _, y in test) == info.num_test and test.bad_images == []


def test_a_batch_of_only_bad_images_raises_even_when_skipping(tmp_path):
    root = make_image_folder(tmp_path / "jpegs", num_classes=1, train_per_class=2, size=16)
    for f in (root / "train" / "class_000").iterdir():
        f.write_bytes(b"")
    samples = [(str(f), 0) for f in sorted((root / "train" / "class_000").iterdir())]
    loader = FolderLoader(
        samples, transform=folder_transform(8, train=False), batch_size=2, skip_bad_images=True
    )
    with pytest.raises(BadImageError, match="all 2 images of a batch are unreadable"):
        list(loader)
    assert loader.bad_images == [p for p, _ in samples]


def test_image_size_from_the_first_readable_image(spoiled, caplog):
    root, bad = spoiled
    samples = [(bad[0], 0), (str(root / "train" / "class_000" / "00000.jpg"), 0)]
    with pytest.raises(BadImageError, match="00001.jpg"):
        infer_image_size(samples)
    with caplog.at_level(logging.WARNING, logger="cenet.data"):
        assert infer_image_size(samples, skip_bad_images=True) == 24
    assert bad[0] in caplog.text
    with pytest.raises(ValueError, match="no readable image"):
        infer_image_size(samples[:1], skip_bad_images=True)


def test_collate_drops_markers_and_keeps_labels_aligned():
    from cenet.data.badimage import BadImage

    items = [
        (torch.ones(3, 2, 2), 4),
        (BadImage("a.jpg", "OSError: x"), 5),
        (torch.zeros(3, 2, 2), 6),
    ]
    images, labels, bad = BatchCollate(channels_last=True)(items)
    assert images.shape == (2, 3, 2, 2) and labels.tolist() == [4, 6]
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert bad == (("a.jpg", "OSError: x"),)
    assert BatchCollate()(items[1:2]) == (None, None, bad)
