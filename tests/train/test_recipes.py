"""The bundled ImageNet recipes (``cenet/configs/imagenet_*.yaml``, issue 15; docs/recipes.md).

Each recipe must load, name a registered model of its architecture and variant, carry the
paper's numbers (appendix G; any edit of a recipe number fails :func:`test_recipe_numbers`) and
run unchanged through ``cenet train`` for two optimizer steps on a tiny synthetic JPEG folder,
with only the data, image size, batch size, device and loader settings overridden.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from cenet.cli.main import main
from cenet.data.synthetic import make_image_folder
from cenet.models import create_model, list_models
from cenet.train import bundled_configs, load_config
from cenet.train.config import resolve_config_path
from cenet.train.schedule import build_scheduler

# ------------------------------------------------------------------------------ the recipes

#: appendix G, "ResNet Training Setting on ImageNet" (+ the reference config's 5 warm-up epochs)
RESNET = {
    "epochs": 100,
    "batch_size": 256,
    "lr": 0.1,
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 1e-4,
    "no_wd_1d": False,
    "schedule": "multistep",
    "milestones": [30.0, 60.0, 90.0],
    "gamma": 0.1,
    "label_smoothing": 0.1,
    "warmup_epochs": 5.0,
    "warmup_start_factor": 0.001,
}
#: appendix G, "MobileNet V2 training setting on ImageNet" (no warm-up)
MOBILENET = {
    "epochs": 150,
    "batch_size": 256,
    "lr": 0.05,
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 4e-5,
    "no_wd_1d": False,
    "schedule": "cosine",
    "min_lr": 0.0,
    "label_smoothing": 0.1,
    "warmup_epochs": 0.0,
}
#: appendix G, "ShuffleNet V2 training setting on ImageNet"; power, warm-up length and start,
#: smoothing value and momentum are our choices (docs/recipes.md)
SHUFFLENET = {
    "epochs": 240,
    "batch_size": 1024,
    "lr": 0.5,
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 4e-5,
    "no_wd_1d": False,
    "schedule": "poly",
    "poly_power": 1.0,
    "label_smoothing": 0.1,
    "warmup_epochs": 5.0,
    "warmup_start_factor": 0.001,
}
#: what every ImageNet recipe shares
COMMON = {
    "dataset": "folder",
    "data": None,
    "image_size": 224,
    "num_classes": None,
    "model_kwargs": {},
    "grad_accum_steps": 1,
    "device": "cuda",
    "sync_ce": False,  # appendix G: BD's covariance "within each GPU"
    "sync_bn": False,
    "amp": None,
    "channels_last": True,
    "num_workers": 8,
    "eval_every": 1,
    "checkpoint_every_steps": 1000,
    "max_steps": None,
    "train_subset": None,
    "label_noise": 0.0,
    "seed": 0,
}

ARCHS = {  # config stem -> (model name stem, recipe, paper table)
    "resnet18": ("resnet18", RESNET, "Table 1"),
    "resnet34": ("resnet34", RESNET, None),  # not in the paper's tables
    "resnet50": ("resnet50", RESNET, "Table 1"),
    "resnet101": ("resnet101", RESNET, "Table 1"),
    "mobilenet_v2": ("mobilenet_v2", MOBILENET, "Table 2"),
    "shufflenet_v2_x1_0": ("shufflenet_v2_x1_0", SHUFFLENET, "Table 2"),
    "shufflenet_v2_x0_5": ("shufflenet_v2_x0_5", SHUFFLENET, "Table 2"),
}
VARIANTS = {"ce": "_ce", "bn": "", "se": "_se"}  # config suffix -> model name suffix

#: (config name, model name, recipe numbers, paper table)
EXPECTED = [
    (f"imagenet_{arch}_{variant}", model + suffix, recipe, table)
    for arch, (model, recipe, table) in ARCHS.items()
    for variant, suffix in VARIANTS.items()
]
NAMES = [name for name, *_ in EXPECTED]

#: the paper's top-1 per config (Tables 1, 2), which each header must quote
PAPER_TOP1 = {
    "resnet18": {"bn": 70.4, "se": 71.4, "ce": 71.9},
    "resnet50": {"bn": 76.6, "se": 77.6, "ce": 78.2},
    "resnet101": {"bn": 78.0, "se": 78.5, "ce": 79.0},
    "mobilenet_v2": {"bn": 72.5, "se": 73.5, "ce": 74.6},
    "shufflenet_v2_x1_0": {"bn": 69.0, "se": 70.7, "ce": 71.2},
    "shufflenet_v2_x0_5": {"bn": 59.2, "se": 60.2, "ce": 60.5},
}


def header(name: str) -> str:
    """The leading comment block of a bundled config."""
    text = resolve_config_path(name).read_text(encoding="utf-8")
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


# ------------------------------------------------------------------------------ static checks


def test_the_bundled_imagenet_configs_are_exactly_the_recipes() -> None:
    assert sorted(n for n in bundled_configs() if n.startswith("imagenet_")) == sorted(NAMES)


@pytest.mark.parametrize(("name", "model", "recipe", "table"), EXPECTED, ids=NAMES)
def test_recipe_loads_and_names_its_model(name: str, model: str, recipe, table) -> None:
    cfg = load_config(name)
    assert cfg.model == model
    assert model in list_models()
    assert cfg.out == f"runs/{name}"


@pytest.mark.parametrize(("name", "model", "recipe", "table"), EXPECTED, ids=NAMES)
def test_recipe_numbers(name: str, model: str, recipe, table) -> None:
    cfg = load_config(name).to_dict()
    expected = {**COMMON, **recipe}
    assert {key: cfg[key] for key in expected} == expected
    # the file states them itself: none of them comes from a TrainConfig default
    stated = yaml.safe_load(resolve_config_path(name).read_text(encoding="utf-8"))
    for key in (*recipe, "dataset", "image_size", "device", "channels_last", "num_workers"):
        assert key in stated, f"{name} leaves {key} to the TrainConfig default"


@pytest.mark.parametrize(("name", "model", "recipe", "table"), EXPECTED, ids=NAMES)
def test_recipe_header_names_source_result_and_command(name: str, model, recipe, table) -> None:
    text = header(name)
    assert "appendix G" in text
    assert f"torchrun --nproc_per_node 8 -m cenet train --config {name} " in text
    assert "--data /path/to/imagenet" in text and "--grad-accum" in text
    arch, variant = name.removeprefix("imagenet_").rsplit("_", 1)
    if table is None:
        assert "not in the paper's tables" in text
    else:
        assert f"Paper ({table}): top-1 {PAPER_TOP1[arch][variant]}" in text


def lr_curve(name: str, iters_per_epoch: int = 10) -> list[float]:
    """The LR of every iteration of the recipe's schedule, at ``iters_per_epoch``."""
    cfg = load_config(name)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, iters_per_epoch)
    lrs = []
    for _ in range(cfg.epochs * iters_per_epoch):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_resnet_schedule(depth: int) -> None:
    """5 warm-up epochs from ~0, then 0.1, x0.1 at epochs 30, 60 and 90 (10 iterations each)."""
    lrs = lr_curve(f"imagenet_resnet{depth}_ce")
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[49] < 0.1 and lrs[50] == pytest.approx(0.1) and lrs[299] == pytest.approx(0.1)
    for epoch, lr in ((30, 0.01), (60, 1e-3), (90, 1e-4)):
        assert lrs[epoch * 10 - 1] == pytest.approx(lr * 10)
        assert lrs[epoch * 10] == pytest.approx(lr)
    assert lrs[-1] == pytest.approx(1e-4)


def test_mobilenet_schedule() -> None:
    """Cosine from 0.05 (no warm-up) down to 0 over 150 epochs; half-way at epoch 75."""
    lrs = lr_curve("imagenet_mobilenet_v2_ce")
    assert lrs[0] == pytest.approx(0.05)
    assert lrs[750] == pytest.approx(0.025)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-6)


def test_shufflenet_schedule() -> None:
    """Warm-up over 5 epochs, then 0.5 decayed linearly to 0 by epoch 240."""
    lrs = lr_curve("imagenet_shufflenet_v2_x1_0_ce")
    assert lrs[0] == pytest.approx(5e-4)
    assert lrs[50] == pytest.approx(0.5)
    assert lrs[50 + 1175] == pytest.approx(0.25)  # half-way through the 2350 decay iterations
    assert lrs[-1] == pytest.approx(0.5 / 2350)


# ------------------------------------------------------------------------------ smoke runs


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes of 40x40 JPEGs: 4 per class in train/, 2 in val/ (4 iterations of batch 4)."""
    root = tmp_path_factory.mktemp("imagenet_like")
    return make_image_folder(root, num_classes=4, train_per_class=4, val_per_class=2, size=40)


#: the smoke runs' input side. At 32 the last stage of every network is a 1x1 map, so with batch 4
#: its BN and CE layers see 4 values per channel: BD's covariance (groups of 16) has rank <= 3,
#: and a fresh CE-ResNet-34 then gives logits of std ~70 in training mode (loss ~100), the
#: first MobileNetV2-CE step has gradients ~1e5 (NaN within three steps at lr 0.05, its recipe
#: having no warm-up), and several evaluations overflow to NaN. At 64 the last maps are 2x2
#: (16 values per channel) and everything is finite.
SMOKE_IMAGE_SIZE = 64
SMOKE_THREADS = 2


@pytest.mark.slow
@pytest.mark.parametrize(("name", "model", "recipe", "table"), EXPECTED, ids=NAMES)
def test_recipe_runs(
    name: str, model: str, recipe, table, jpeg_folder: Path, tmp_path: Path
) -> None:
    """``cenet train --config NAME`` for 2 optimizer steps, then evaluation and checkpoint."""
    out = tmp_path / "run"
    size = SMOKE_IMAGE_SIZE
    argv = [
        "train", "--config", name, "--data", str(jpeg_folder), "--image-size", str(size),
        "--batch-size", "4", "--max-steps", "2", "--threads", str(SMOKE_THREADS), "--device", "cpu",
        "--out", str(out), "--no-progress",
        "--set", "eval_batch_size=8", "--set", "num_workers=0",
    ]  # fmt: skip
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1
    assert records[0]["global_step"] == 2
    assert math.isfinite(records[0]["train_loss"]) and math.isfinite(records[0]["test_loss"])
    # the run is the recipe with only the overrides above changed
    resolved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    expected = {
        **COMMON,
        **recipe,
        "model": model,
        "num_classes": 4,
        "data": str(jpeg_folder),
        "image_size": size,
        "batch_size": 4,
        "device": "cpu",
        "num_workers": 0,
        "max_steps": 2,
    }
    assert {key: resolved[key] for key in expected} == expected
    # the checkpoint holds the recipe's model
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["config"]["model"] == model
    with torch.device("meta"):  # names and shapes only, without initializing the weights
        reference = create_model(model, num_classes=4)
    assert list(ckpt["model"]) == list(reference.state_dict())
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ckpt["model"].items()} == shapes
