"""GCT parameter and gate statistics (GCT paper Fig. 3)."""

import json

import pytest
import torch
from torch import nn

from cenet.analysis import gct_gate_values, gct_parameters
from cenet.layers import GatedChannelTransformation


def test_parameters_stats_and_gate_values_match_eqn4_by_hand():
    gct = GatedChannelTransformation(2)
    with torch.no_grad():
        gct.gamma.copy_(torch.tensor([1.0, -3.0]))
        gct.beta.copy_(torch.tensor([0.5, 0.0]))
    net = nn.Sequential(nn.Conv2d(3, 2, 1), gct, nn.ReLU())
    params = gct_parameters(net)
    assert list(params) == ["1"]
    assert params["1"].stats["gamma"] == pytest.approx(
        {"mean": -1.0, "std": 8**0.5, "min": -3.0, "max": 1.0}
    )
    json.dumps(params["1"].to_dict())
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 3, 4, 4, generator=gen) for _ in range(2)]
    gates = gct_gate_values(net, batches)["1"]
    assert gates.shape == (6, 2)
    with torch.no_grad():
        y = net[0](torch.cat(batches)).double()
        s = (y.square().sum((2, 3)) + gct.eps).sqrt()  # Eqn 2, alpha = 1
        s_hat = 2**0.5 * s / (s.square().sum(1, keepdim=True) + gct.eps).sqrt()  # Eqn 3
        ref = 1 + torch.tanh(gct.gamma.double() * s_hat + gct.beta.double())  # Eqn 4
    torch.testing.assert_close(gates, ref.float())
    with pytest.raises(ValueError, match="matches no module"):
        gct_parameters(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="not a GCT"):
        gct_parameters(net, layers="0")
