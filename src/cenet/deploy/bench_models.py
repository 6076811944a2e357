"""What ``cenet bench`` measures and how it counts (:mod:`cenet.deploy.bench`): the networks of
the table grouped under their BN network, parameters, multiply-adds, and the calibration of
running statistics; the paper's Table 1 to compare with."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import cenet
from cenet.deploy.bench_backends import BACKENDS
from cenet.models.registry import get_model_builder

ARCHITECTURES = ("resnet18", "resnet50", "resnet101", "mobilenet_v2", "shufflenet_v2_x1_0")
"""The architectures of the default table (the paper's Tables 1 and 2)."""

VARIANTS = ("bn", "se", "gct", "ce")
"""Variants of each architecture: ``bn`` is the plain network (its registered name has no
suffix), the others are ``<arch>_<variant>``."""

_SUFFIXES = ("_ce", "_bd", "_ir", "_se", "_gct", "_iternorm", "_dbn")

PAPER_TABLE1: dict[str, dict[str, float]] = {
    "resnet18": {"gflops": 1.82, "cpu_s": 3.69, "gpu_s": 0.003},
    "resnet18_se": {"gflops": 1.82, "cpu_s": 3.69, "gpu_s": 0.005},
    "resnet18_ce": {"gflops": 1.83, "cpu_s": 4.13, "gpu_s": 0.006},
    "resnet50": {"gflops": 4.14, "cpu_s": 8.61, "gpu_s": 0.005},
    "resnet50_se": {"gflops": 4.15, "cpu_s": 11.08, "gpu_s": 0.010},
    "resnet50_ce": {"gflops": 4.16, "cpu_s": 11.06, "gpu_s": 0.009},
    "resnet101": {"gflops": 7.87, "cpu_s": 15.58, "gpu_s": 0.011},
    "resnet101_se": {"gflops": 7.88, "cpu_s": 19.34, "gpu_s": 0.040},
    "resnet101_ce": {"gflops": 7.89, "cpu_s": 17.05, "gpu_s": 0.015},
}
"""The CE paper's Table 1: GFLOPs (multiply-adds) and inference time at batch 32 (CPU: Xeon
E5-2682 v4; GPU: GTX 1080 Ti; PyTorch)."""



def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """``"1,32"`` → ``(1, 32)``. Raises ValueError for anything but distinct positive ints."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"batch sizes must be comma-separated positive integers such as "
                         f"'1,32', got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes) or len(set(sizes)) != len(sizes):
        raise ValueError(f"batch sizes must be distinct positive integers such as '1,32', "
                         f"got {text!r}")
    return sizes


def parse_backends(text: str) -> tuple[str, ...]:
    """``"eager,fused"`` → ``("eager", "fused")``; ValueError for an unknown or repeated name."""
    names = tuple(p.strip() for p in str(text).split(",") if p.strip())
    bad = [n for n in names if n not in BACKENDS]
    if not names or bad or len(set(names)) != len(names):
        raise ValueError(f"backends must be distinct names among {', '.join(BACKENDS)}, "
                         f"comma-separated, got {text!r}")
    return names


def reference_of(name: str, registered: set[str]) -> str:
    """The BN network ``name`` is a variant of (``resnet50_ce`` → ``resnet50``); ``name`` itself
    for a plain network or one without a registered plain twin."""
    for suffix in _SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in registered:
            return name[: -len(suffix)]
    return name


def select_models(names: Sequence[str] | None) -> tuple[dict[str, list[str]], list[str]]:
    """The networks to measure, grouped by their BN reference (which comes first in its
    group), and notes on what was skipped or added.

    Raises:
        ValueError: for a name that is not registered or a pattern that matches none.
    """
    registered = set(cenet.list_models())
    notes: list[str] = []
    chosen: list[str] = []
    if names is None:
        for arch in ARCHITECTURES:
            for variant in VARIANTS:
                name = arch if variant == "bn" else f"{arch}_{variant}"
                if name in registered:
                    chosen.append(name)
                else:
                    notes.append(f"{name}: not registered (cenet has no {variant.upper()} "
                                 f"variant of {arch}), skipped")
    else:
        for name in names:
            if any(ch in name for ch in "*?["):
                matches = sorted(n for n in registered if fnmatch.fnmatch(n, name))
                if not matches:
                    raise ValueError(f"no registered model matches {name!r} (`cenet models` "
                                     "lists them)")
                chosen.extend(matches)
            else:
                get_model_builder(name)  # ValueError with close matches
                chosen.append(name)
    groups: dict[str, list[str]] = {}
    for name in dict.fromkeys(chosen):
        groups.setdefault(reference_of(name, registered), []).append(name)
    for ref, members in groups.items():
        if ref not in members:
            notes.append(f"{ref}: added as the BN reference of {', '.join(members)}")
        groups[ref] = [ref, *(m for m in members if m != ref)]
    return groups, notes


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers not included)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, image_size: int, device: str | torch.device = "cpu") -> int:
    """Multiply-adds of one eval forward of a 1×3×S×S image (FlopCounterMode FLOPs / 2: matrix
    products, convolutions and ``cenet::ce_eval``; not normalization, activations, pooling or
    other elementwise work). ``model`` must be in eval mode."""
    x = torch.randn(1, 3, image_size, image_size, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


def calibrate(model: nn.Module, image_size: int, *, batch: int = 4, seed: int = 0,
              device: str | torch.device = "cpu") -> nn.Module:
    """Fill ``model``'s running statistics (BN, CE, ...) from one training-mode forward of
    random images, each running estimate replaced by the batch's (momentum 1 for that step;
    no weight changes), then put it in eval mode. Returns ``model``."""
    momenta = {}
    for m in model.modules():
        if isinstance(getattr(m, "momentum", None), float):
            momenta[m] = m.momentum
            m.momentum = 1.0
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, image_size, image_size, generator=gen).to(device)
    try:
        model.train()
        with torch.no_grad():
            model(x)
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        model.eval()
    return model
