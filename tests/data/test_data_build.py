"""cenet.data.build_loaders end to end, train_subset, label_noise and the ImageFolder path."""

from __future__ import annotations

import pytest
import torch

from cenet.data import DatasetInfo, build_loaders, load_cifar10
from cenet.data.locate import identify_data
from cenet.data.noise import noisy_labels
from cenet.data.subset import balanced_subset, eval_order


def _same(a, b) -> bool:
    """Two lists of (images, labels) batches are identical."""
    return len(a) == len(b) and all(
        torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True)
    )


def test_cifar10_from_jpeg_tar(jpeg_tar):
    train, test, info = build_loaders(data=str(jpeg_tar.path), batch_size=8, eval_batch_size=4)
    assert info == DatasetInfo("cifar10", 10, info.classes, 20, 10, 32, jpeg_tar.path)
    assert info.classes[0] == "airplane" and info.classes[9] == "truck"
    assert len(train) == 2 and train.batch_size == 8 and train.num_samples == 20  # drop_last
    assert len(test) == 3 and test.batch_size == 4 and test.num_samples == 10  # keeps last
    x, y = next(iter(train))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    labels = torch.cat([y for _, y in test])
    # the archive is sorted by class; the test loader uses the fixed evaluation order
    assert labels.tolist() == eval_order(10).tolist() and labels.tolist() != list(range(10))
    test.set_epoch(7)  # the same order every epoch and every run
    assert torch.cat([y for _, y in test]).tolist() == labels.tolist()


def test_cifar10_from_python_release(python_tar):
    train, test, info = build_loaders(data=python_tar.path, batch_size=5)
    assert (info.num_train, info.num_test, info.root) == (20, 6, python_tar.path)
    x, y = next(iter(test))
    first = eval_order(6)[:5].numpy()
    want = torch.from_numpy(python_tar.test_rows[first].reshape(5, 3, 32, 32))
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    assert torch.allclose(x, (want / 255 - mean) / std, atol=1e-5)
    assert y.tolist() == python_tar.test_labels[first].tolist()


def test_train_loader_epochs_are_reproducible(python_tar):
    def epoch_batches(epoch):
        train, _, _ = build_loaders(data=python_tar.path, batch_size=5, seed=3)
        train.set_epoch(epoch)
        return [(x, y) for x, y in train]

    a, b, c = epoch_batches(1), epoch_batches(1), epoch_batches(2)
    assert _same(a, b)
    assert not _same(a, c)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dataset": "imagenet"}, "unknown dataset 'imagenet'; expected one of cifar10, folder"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"eval_batch_size": -2}, "eval_batch_size must be an integer >= 1"),
        ({"label_noise": 1.5}, r"label_noise must be a fraction in \[0, 1\], got 1.5"),
        ({"label_noise": -0.1}, "label_noise must be a fraction"),
        ({"label_noise": float("nan")}, "label_noise must be a fraction"),
        ({"train_subset": 0}, r"train_subset must be an integer >= 1 or None \(all training"),
        (
            {"train_subset": 21},
            "train_subset=21 exceeds the 20 training images; use a value in 1..20",
        ),  # noqa: E501
        ({"image_size": 64}, "image_size must be None or 32"),
        ({"num_workers": -1}, "num_workers must be an integer >= 0"),
    ],
)
def test_bad_arguments_raise(python_tar, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_loaders(data=python_tar.path, **kwargs)


def test_train_subset_is_balanced_and_seeded(python_tar):
    _, _, full = build_loaders(data=python_tar.path)
    train, _, info = build_loaders(data=python_tar.path, train_subset=7, batch_size=3, seed=1)
    assert info.num_train == 7 and train.num_samples == 7 and len(train) == 2
    assert full.num_train == 20

    labels = torch.arange(10).repeat_interleave(100)  # 10 classes x 100
    idx = balanced_subset(labels, 250, seed=0)
    assert idx.numel() == 250 and idx.unique().numel() == 250
    counts = torch.bincount(labels[idx], minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 250
    assert torch.equal(idx, balanced_subset(labels, 250, seed=0))
    assert not torch.equal(idx, balanced_subset(labels, 250, seed=1))
    uneven = torch.tensor([0] * 50 + [1] * 2)  # a class runs out: the rest come from class 0
    assert torch.bincount(uneven[balanced_subset(uneven, 10, seed=0)]).tolist() == [8, 2]
    with pytest.raises(ValueError, match="between 1 and 52"):
        balanced_subset(uneven, 53)


def test_label_noise_fraction_and_determinism():
    labels = torch.randint(0, 10, (20_000,), generator=torch.Generator().manual_seed(0))
    for p in (0.0, 0.2, 0.5, 1.0):
        noisy = noisy_labels(labels, p, 10, seed=4)
        changed = (noisy != labels).float().mean().item()
        assert abs(changed - p * 0.9) < 0.015, (p, changed)
        assert noisy.min() >= 0 and noisy.max() <= 9
        assert torch.equal(noisy, noisy_labels(labels, p, 10, seed=4))
    assert not torch.equal(
        noisy_labels(labels, 0.5, 10, seed=1), noisy_labels(labels, 0.5, 10, seed=2)
    )
    # p = 1: labels are uniform over all classes, independent of the true ones
    counts = torch.bincount(noisy_labels(labels, 1.0, 10, seed=0), minlength=10).float()
    assert (counts / counts.sum() - 0.1).abs().max() < 0.01
    with pytest.raises(ValueError, match="label_noise"):
        noisy_labels(labels, 1.01, 10)


def test_label_noise_touches_only_training_labels(python_tar):
    clean = load_cifar10(identify_data(python_tar.path))
    train, test, _ = build_loaders(data=python_tar.path, batch_size=20, label_noise=1.0, seed=0)
    train_labels = torch.sort(torch.cat([y for _, y in train])).values
    # training labels are redrawn (multiset changes), test labels are the clean ones
    assert not torch.equal(train_labels, torch.sort(clean.train_labels).values)
    assert torch.equal(torch.cat([y for _, y in test]), clean.test_labels[eval_order(6)])
    train2, _, _ = build_loaders(data=python_tar.path, batch_size=20, label_noise=1.0, seed=0)
    assert torch.equal(torch.sort(torch.cat([y for _, y in train2])).values, train_labels)


def test_folder_rgb_from_gray_and_rgba_resized(image_folder):
    train, test, info = build_loaders(
        dataset="folder", data=image_folder, batch_size=2, eval_batch_size=4, image_size=24
    )
    assert info.name == "pets" and info.classes == ("cats", "dogs") and info.num_classes == 2
    assert (info.num_train, info.num_test, info.image_size) == (5, 2, 24)  # val/ beats test/
    assert len(train) == 2 and len(test) == 1
    x, y = next(iter(test))
    assert x.shape == (2, 3, 24, 24) and x.dtype == torch.float32
    assert y.tolist() == [1, 0]  # the fixed evaluation order, eval_order(2) = [1, 0]
    # val/cats/0.png is gray 128 -> equal channels; val/dogs/0.png is RGBA (10, 200, 10)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    pixels = x * std + mean
    # solid images stay solid through the resize: exact up to float32 rounding
    torch.testing.assert_close(pixels[1], torch.full((3, 24, 24), 128 / 255), rtol=0, atol=1e-6)
    torch.testing.assert_close(pixels[0, :, 12, 12], torch.tensor([10, 200, 10]) / 255,
                               rtol=0, atol=1e-6)
    batches = [(x, y) for x, y in train]
    assert [b[0].shape for b in batches] == [(2, 3, 24, 24)] * 2


def test_folder_determinism_and_workers(image_folder):
    def run(epoch, workers):
        train, _, _ = build_loaders(
            dataset="folder",
            data=image_folder,
            batch_size=2,
            image_size=16,
            seed=2,
            num_workers=workers,
        )
        train.set_epoch(epoch)
        return [(x, y) for x, y in train]

    a, b, c = run(0, 0), run(0, 0), run(1, 0)
    assert _same(a, b)
    assert not _same(a, c)
    assert _same(a, run(0, 2))  # worker processes give the very same batches


def test_folder_image_size_inferred_and_missing_data(image_folder, jpeg_tar):
    _, _, info = build_loaders(dataset="folder", data=image_folder)
    assert info.image_size == 30  # shorter side of train/cats/0.png (40x30)
    with pytest.raises(FileNotFoundError, match="holds no folder data"):
        build_loaders(dataset="folder", data=jpeg_tar.path)
