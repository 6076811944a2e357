"""SGD with momentum and the weight-decay / no-weight-decay parameter groups."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from cenet.layers import gct_no_decay_parameters
from cenet.train.config import TrainConfig


def param_groups(
    model: nn.Module,
    *,
    weight_decay: float,
    no_wd_1d: bool,
    no_wd: Iterable[nn.Parameter] = (),
) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``model`` into optimizer groups.

    Args:
        model: the network; parameters with ``requires_grad=False`` are left out.
        weight_decay: L2 coefficient of the decayed group.
        no_wd_1d: if true, every parameter with ``ndim <= 1`` (norm and CE weights, biases,
            scalars) goes to a second group with ``weight_decay=0``.
        no_wd: further parameters for the group without weight decay (e.g. GCT's β,
            :func:`cenet.layers.gct_no_decay_parameters`).

    Returns:
        ``[{"params": decayed, "weight_decay": weight_decay}]`` plus, when any parameter is
        exempt, a group ``{"params": not_decayed, "weight_decay": 0.0}``; parameter order
        follows ``model.named_parameters()``. Empty groups are dropped.
    """
    exempt = {id(p) for p in no_wd}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if (no_wd_1d and p.ndim <= 1) or id(p) in exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """``torch.optim.SGD`` over :func:`param_groups` with the LR and momentum of ``cfg``.

    Raises:
        ValueError: if the model has no trainable parameter.
    """
    gct = () if cfg.gct_no_wd == "none" else gct_no_decay_parameters(model, cfg.gct_no_wd)
    groups = param_groups(
        model, weight_decay=cfg.weight_decay, no_wd_1d=cfg.no_wd_1d, no_wd=gct
    )
    if not groups:
        raise ValueError(f"model {cfg.model!r} has no trainable parameter")
    return torch.optim.SGD(
        groups,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )
