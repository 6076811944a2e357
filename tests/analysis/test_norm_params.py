"""Ratios of small γ and non-positive β (CE paper Tables 6, 9) from hand-set parameters."""

import json

import pytest
import torch
from torch import nn

from cenet.analysis import norm_parameter_conditions
from cenet.layers import IterNorm


def _set(module, gamma, beta):
    with torch.no_grad():
        module.weight.copy_(torch.tensor(gamma))
        module.bias.copy_(torch.tensor(beta))


def test_hand_set_gamma_beta_ratios():
    bn, gn, it = nn.BatchNorm2d(4), nn.GroupNorm(2, 4), IterNorm(4, group_size=4)
    _set(bn, [0.05, -0.5, 0.2, 1.0], [0.0, -1.0, 0.3, 0.1])
    _set(gn, [1.0, 1.0, 0.09, -0.01], [1.0, 1.0, 1.0, 1.0])
    _set(it, [0.5, 0.5, 0.5, 0.5], [-1.0, -1.0, -1.0, 0.5])
    net = nn.Sequential(bn, gn, it, nn.BatchNorm2d(4, affine=False), nn.LayerNorm([4, 2]))
    res = norm_parameter_conditions(net)
    assert list(res.layers) == ["0", "1", "2"]  # no 1-D affine: skipped
    b = res.layers["0"]
    assert (b.gamma_small, b.gamma_below, b.beta_nonpositive) == (0.25, 0.5, 0.5)
    g = res.layers["1"]
    assert (g.gamma_small, g.gamma_below, g.beta_nonpositive) == (0.5, 0.5, 0.0)
    assert res.layers["2"].beta_nonpositive == 0.75
    o = res.overall
    assert (o.num_channels, o.gamma_small, o.gamma_below, o.beta_nonpositive) == (
        12, 3 / 12, 4 / 12, 5 / 12
    )
    assert res.layer_mean.gamma_small == pytest.approx((0.25 + 0.5 + 0) / 3)
    json.dumps(res.to_dict())


def test_explicit_selection_without_affine_raises():
    net = nn.Sequential(nn.BatchNorm2d(4, affine=False))
    with pytest.raises(ValueError, match="no selected module"):
        norm_parameter_conditions(net)
    with pytest.raises(ValueError, match="'0' .*no 1-D affine"):
        norm_parameter_conditions(net, layers="0")
