"""Optimizer parameter groups: with no_wd_1d exactly the params of ndim <= 1 are not decayed."""

from __future__ import annotations

import torch

from cenet.models import create_model
from cenet.train import TrainConfig, build_optimizer, param_groups


def test_no_wd_groups_hold_exactly_the_1d_params() -> None:
    model = create_model("_test_tiny_cnn", num_classes=10)
    groups = param_groups(model, weight_decay=5e-4, no_wd_1d=True)
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    decayed = {id(p) for p in groups[0]["params"]}
    not_decayed = {id(p) for p in groups[1]["params"]}
    named = dict(model.named_parameters())
    want_nd = {id(p) for p in named.values() if p.ndim <= 1}
    assert not_decayed == want_nd
    assert decayed == {id(p) for p in named.values()} - want_nd
    # the tiny model has BN weight/bias, conv bias, fc bias (1-D) and a scalar (0-D)
    nd_names = sorted(n for n, p in named.items() if id(p) in not_decayed)
    assert nd_names == [
        "fc.bias",
        "features.1.bias",
        "features.1.weight",
        "features.4.bias",
        "scale",
    ]


def test_without_no_wd_every_param_is_decayed_and_frozen_ones_left_out() -> None:
    model = create_model("_test_tiny_cnn", num_classes=10)
    model.fc.weight.requires_grad_(False)
    groups = param_groups(model, weight_decay=1e-4, no_wd_1d=False)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 1e-4
    ids = {id(p) for p in groups[0]["params"]}
    assert id(model.fc.weight) not in ids
    assert len(ids) == sum(1 for p in model.parameters() if p.requires_grad)


def test_build_optimizer_settings() -> None:
    model = create_model("_test_tiny_cnn", num_classes=10)
    cfg = TrainConfig(lr=0.3, momentum=0.8, nesterov=True, weight_decay=1e-3, no_wd_1d=True)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.SGD)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-3, 0.0]
    assert all(g["lr"] == 0.3 and g["momentum"] == 0.8 and g["nesterov"] for g in opt.param_groups)


def test_gct_betas_are_exempt_from_weight_decay_by_default() -> None:
    from torch import nn

    from cenet.layers import GatedChannelTransformation

    model = nn.Sequential(GatedChannelTransformation(3), nn.Conv2d(3, 4, 3))
    cfg = TrainConfig(model="cifar_resnet20", weight_decay=1e-4)
    groups = build_optimizer(model, cfg).param_groups
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]
    assert [id(p) for p in groups[1]["params"]] == [id(model[0].beta)]
    cfg_all = TrainConfig(model="cifar_resnet20", weight_decay=1e-4, gct_no_wd="all")
    exempt = build_optimizer(model, cfg_all).param_groups[1]["params"]
    assert {id(p) for p in exempt} == {id(p) for p in model[0].parameters()}
    cfg_none = TrainConfig(model="cifar_resnet20", weight_decay=1e-4, gct_no_wd="none")
    assert len(build_optimizer(model, cfg_none).param_groups) == 1
