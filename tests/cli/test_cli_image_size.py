"""``cenet train --image-size N``: reaches the config (``image_size``) and the data pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from PIL import Image

import cenet.train.runtime as runtime
import cenet.train.session as session
from cenet.cli.main import main
from cenet.cli.train import positive_int


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """train/ and val/ with two classes of 40x30 RGB images (shorter side 30)."""
    root = tmp_path / "shapes"
    for split, count in (("train", 3), ("val", 1)):
        for k, name in enumerate(("a", "b")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                color = (200 * k, 40 * i, 100)
                Image.new("RGB", (40, 30), color).save(folder / f"{i}.png")
    return root


def test_image_size_reaches_the_config(capsys) -> None:
    assert main(["train", "--dataset", "folder", "--image-size", "64", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["image_size"] == 64
    assert main(["train", "--image-size", "32", "--print-config"]) == 0  # CIFAR's own size
    assert yaml.safe_load(capsys.readouterr().out)["image_size"] == 32
    # the flag wins over --set, as every named option does
    assert main(["train", "--dataset", "folder", "--set", "image_size=8",
                 "--image-size", "24", "--print-config"]) == 0  # fmt: skip
    assert yaml.safe_load(capsys.readouterr().out)["image_size"] == 24


@pytest.mark.parametrize("value", ["0", "-3", "2.5", "big"])
def test_image_size_must_be_a_positive_int(value, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--dataset", "folder", "--image-size", value, "--print-config"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --image-size: expected a positive integer" in err and value in err


def test_positive_int() -> None:
    assert positive_int("1") == 1 and positive_int(" 224 ") == 224
    with pytest.raises(Exception, match=r"positive integer \(>= 1\), got 0"):
        positive_int("0")


def test_cifar10_takes_only_its_native_size(capsys) -> None:
    assert main(["train", "--image-size", "64", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "invalid image_size=64" in err and "32" in err and "dataset=folder" in err


def test_image_size_reaches_the_loaders_and_the_model(image_folder, tmp_path, monkeypatch,
                                                      capsys) -> None:
    loaded, inputs = [], []
    real_build_loaders, real_build_model = runtime.build_loaders, session.build_model

    def build_loaders(**kwargs):
        train, test, info = real_build_loaders(**kwargs)
        loaded.append((kwargs["image_size"], info.image_size))
        return train, test, info

    def build_model(cfg, num_classes):
        model = real_build_model(cfg, num_classes)
        model.register_forward_pre_hook(lambda _m, args: inputs.append(tuple(args[0].shape)))
        return model

    monkeypatch.setattr(runtime, "build_loaders", build_loaders)
    monkeypatch.setattr(session, "build_model", build_model)
    out = tmp_path / "run"
    code = main(["-q", "train", "--model", "_test_tiny_cnn", "--dataset", "folder",
                 "--data", str(image_folder), "--image-size", "16", "--epochs", "1",
                 "--batch-size", "2", "--threads", "1", "--no-progress",
                 "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert loaded == [(16, 16)]
    # 3 training batches of 2 (6 images) and the 2 test images; every one 16x16, not 30x30
    assert len(inputs) >= 4 and {shape[1:] for shape in inputs} == {(3, 16, 16)}
    assert yaml.safe_load((out / "config.yaml").read_text())["image_size"] == 16


def test_help_explains_the_image_size_per_data_set(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "--image-size N input side in pixels, N x N for training and test." in text
    assert "cifar10: only 32, its native size (the default)" in text
    assert "RandomResizedCrop(N)" in text and "Resize(N/0.875) and CenterCrop(N)" in text
