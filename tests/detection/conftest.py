"""Shared fixtures of the detection tests: a tiny synthetic COCO set (8 train + 4 val images of
64 x 64 px, :func:`cenet.detection.synthetic.make_synthetic_coco`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cenet.detection.synthetic import make_synthetic_coco

SYNTHETIC_COCO = {"num_train": 8, "num_val": 4, "image_size": 64, "max_objects": 3, "seed": 0}
"""The arguments of the session's synthetic set (``splits`` ``train2017``, ``val2017``)."""


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a synthetic COCO 2017 layout (``annotations/instances_{train,val}2017.json``,
    ``train2017/``, ``val2017/``) shared by the session: do not modify it (see
    :func:`synthetic_coco_copy`)."""
    return make_synthetic_coco(tmp_path_factory.mktemp("synthetic_coco"), **SYNTHETIC_COCO)


@pytest.fixture
def synthetic_coco_copy(synthetic_coco: Path, tmp_path: Path) -> Path:
    """A private, writable copy of :func:`synthetic_coco` (for tests that spoil files)."""
    return Path(shutil.copytree(synthetic_coco, tmp_path / "coco"))
