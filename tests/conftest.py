"""Shared fixtures: a tiny CIFAR-10 in the official python format and a tiny registered model.

``_test_tiny_cnn`` is registered in :mod:`cenet.models` when this file is imported, so tests
(and subprocesses that ``import conftest``, see :data:`CLI_RUNNER`) can train it by name.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cenet.models import list_models, register_model

TESTS_DIR = Path(__file__).resolve().parent
SRC_DIR = TESTS_DIR.parent / "src"

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

TINY_MODEL = "_test_tiny_cnn"

CLI_RUNNER = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); import conftest; "
    "from cenet.cli.main import main; raise SystemExit(main(sys.argv[1:]))"
)
"""``python -c CLI_RUNNER TESTS_DIR ARGS...`` runs ``cenet ARGS...`` with the tiny model."""


class TinyCNN(nn.Module):
    """conv-BN-ReLU-pool-conv-ReLU-GAP-dropout-linear, times a learnable scalar ``scale``.

    Has 4-D, 2-D, 1-D and 0-D parameters (for the weight-decay groups), BN running buffers and
    dropout (so the RNG state matters on resume).
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        c = max(1, int(8 * width))
        self.features = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.MaxPool2d(4),
            nn.Conv2d(c, c, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.2),
        )
        self.fc = nn.Linear(c, num_classes)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x)) * self.scale


if TINY_MODEL not in list_models():

    def _test_tiny_cnn(*, num_classes: int = 10, width: float = 1.0) -> nn.Module:
        return TinyCNN(num_classes, width)

    register_model(_test_tiny_cnn)


def write_tiny_cifar(root: Path, *, per_batch: int = 10, num_test: int = 20, seed: int = 0) -> Path:
    """Write ``root/cifar-10-batches-py/`` in the official python format (five training batches
    of ``per_batch`` images, a test batch of ``num_test``, ``batches.meta``); images are noise
    around a colour that depends on the label, so a model can learn something. Returns the
    ``cifar-10-batches-py`` directory."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(10, 3), dtype=np.int64)
    out = root / "cifar-10-batches-py"
    out.mkdir(parents=True, exist_ok=True)

    def batch(n: int, name: str) -> dict:
        labels = rng.integers(0, 10, size=n)
        planes = base[labels][:, :, None] + rng.integers(-40, 41, size=(n, 3, 1024))
        data = np.clip(planes, 0, 255).astype(np.uint8).reshape(n, 3072)  # R, G, B planes
        return {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in labels],
            b"data": data,
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)],
        }

    for i in range(1, 6):
        with (out / f"data_batch_{i}").open("wb") as f:
            pickle.dump(batch(per_batch, f"training batch {i} of 5"), f, protocol=2)
    with (out / "test_batch").open("wb") as f:
        pickle.dump(batch(num_test, "testing batch 1 of 1"), f, protocol=2)
    meta = {
        b"label_names": [c.encode() for c in CIFAR10_CLASSES],
        b"num_cases_per_batch": per_batch,
        b"num_vis": 3072,
    }
    with (out / "batches.meta").open("wb") as f:
        pickle.dump(meta, f, protocol=2)
    return out


@pytest.fixture(scope="session")
def tiny_cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``cifar-10-batches-py/`` directory with 50 training and 20 test images."""
    return write_tiny_cifar(tmp_path_factory.mktemp("tiny_cifar"))


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for ``cenet`` subprocesses: ``src`` importable, no progress bar, a private
    data cache, one OpenMP thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC_DIR), *filter(None, [env.get("PYTHONPATH", "")])])
    env["CI"] = "1"
    env["CENET_CACHE"] = str(tmp_path_factory.mktemp("cenet_cache"))
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="session")
def cli_command() -> Callable[..., list[str]]:
    """``cli_command(*args)``: the ``argv`` of a subprocess running ``cenet args...`` with
    the tiny model registered."""

    def command(*args: str) -> list[str]:
        return [sys.executable, "-c", CLI_RUNNER, str(TESTS_DIR), *map(str, args)]

    return command


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tests on tiny batches (two threads contend badly with
    other processes on 2 cores); the previous count restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
