"""Squeeze-and-Excitation (Hu et al. 2018): hand computation, layouts, arguments, registry."""

import pytest
import torch
from torch import nn

from cenet.layers import (
    ChannelEquilibrium,
    GatedChannelTransformation,
    SqueezeExcitation,
    attn_names,
    create_attn,
)


def make_input(n=3, c=32, h=5, w=4, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, h, w, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype)


def hand_se(x, se, act=torch.relu):
    w1 = se.fc1.weight[:, :, 0, 0]
    w2 = se.fc2.weight[:, :, 0, 0]
    z = x.mean((2, 3))  # (N, C)
    s = torch.sigmoid(act(z @ w1.T + se.fc1.bias) @ w2.T + se.fc2.bias)
    return x * s[:, :, None, None]


def test_output_matches_hand_computation_with_the_modules_weights():
    torch.manual_seed(0)
    se = SqueezeExcitation(32).double()
    with torch.no_grad():  # make the gate far from 0.5 so a wrong formula shows
        se.fc2.bias.normal_(0, 1)
    x = make_input()
    y = se(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, hand_se(x, se), rtol=1e-12, atol=1e-12)
    # the gate does something: not the identity, not a constant factor
    ratio = (y / x)[:, :, 0, 0]
    assert ratio.std() > 0.05


def test_reduction_and_parameter_names():
    se = SqueezeExcitation(64)
    assert se.rd_channels == 4  # C / 16
    shapes = {k: tuple(v.shape) for k, v in se.state_dict().items()}
    assert shapes == {
        "fc1.weight": (4, 64, 1, 1),
        "fc1.bias": (4,),
        "fc2.weight": (64, 4, 1, 1),
        "fc2.bias": (64,),
    }
    assert SqueezeExcitation(64, rd_ratio=1 / 4).rd_channels == 16
    assert SqueezeExcitation(64, rd_channels=7).rd_channels == 7
    assert SqueezeExcitation(8).rd_channels == 1  # never 0
    assert "64, rd_channels=4" in repr(se)


def test_custom_activation_is_used():
    torch.manual_seed(1)
    se = SqueezeExcitation(16, rd_channels=4, act_layer=nn.Tanh).double()
    x = make_input(c=16)
    torch.testing.assert_close(se(x), hand_se(x, se, act=torch.tanh))
    assert not torch.allclose(se(x), hand_se(x, se))  # ReLU would differ (negative hiddens)


def test_channels_last_gives_the_same_numbers_and_layout():
    se = SqueezeExcitation(32).double()
    x = make_input()
    xc = x.contiguous(memory_format=torch.channels_last)
    y, yc = se(x), se(xc)
    assert yc.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(yc, y, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rd_ratio": 0.0}, "rd_ratio"),
        ({"rd_ratio": 2.0}, "rd_ratio"),
        ({"rd_channels": 0}, "rd_channels"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SqueezeExcitation(16, **kwargs)
    with pytest.raises(ValueError, match="num_features"):
        SqueezeExcitation(0)


def test_bad_inputs_raise():
    se = SqueezeExcitation(16)
    with pytest.raises(ValueError, match="4-D input"):
        se(torch.randn(2, 16, 4))
    with pytest.raises(ValueError, match="num_features=16"):
        se(torch.randn(2, 8, 4, 4))


def test_registered_in_create_attn_next_to_the_existing_blocks():
    assert {"ce", "bd", "ir", "se", "gct"} <= set(attn_names())
    assert isinstance(create_attn("se", 32), SqueezeExcitation)
    assert isinstance(create_attn("SE", 32, rd_ratio=1 / 4), SqueezeExcitation)
    gct = create_attn("gct", 32, mode="l1")
    assert isinstance(gct, GatedChannelTransformation) and gct.mode == "l1"
    assert create_attn("ce", 32).mode == "ce"
    assert isinstance(create_attn("ir", 32), ChannelEquilibrium)
