"""Inhibited-channel ratio (CE paper Sec. 2) on nets with known dead channels."""

import json

import pytest
import torch
from analysis_nets import dead_channel_net, labelled_batches
from torch import nn

from cenet.analysis import inhibited_channels


def test_dead_channels_give_ratio_k_over_c_with_or_without_labels():
    net = dead_channel_net(8, (1, 4, 6))
    batches = labelled_batches()
    for loader in (batches, [x for x, _ in batches]):
        res = inhibited_channels(net, loader)
        layer = res.layers["1"]
        assert (layer.num_channels, layer.num_inhibited, layer.ratio) == (8, 3, 3 / 8)
        assert res.ratio == 3 / 8 and res.num_samples == 12
        assert layer.mean_abs[[1, 4, 6]].eq(0).all() and layer.mean_abs[[0, 2]].ge(1).all()
    # the per-channel mean equals a hand computation over all samples and positions
    x = torch.cat([b for b, _ in batches])
    ref = torch.relu(net[0](x)).double().mean((0, 2, 3))
    torch.testing.assert_close(layer.mean_abs, ref.detach())
    json.dumps(res.to_dict())


def test_threshold_first_n_and_training_flags_restored():
    net = nn.Sequential(dead_channel_net(4, (0,)), nn.ReLU(), nn.Linear(3, 2), nn.LeakyReLU())
    net[0][1].train(False)  # a mixed-mode net: each flag is restored as it was
    net.train()
    net[0][1].eval()
    flags = [m.training for m in net.modules()]
    res = inhibited_channels(net, labelled_batches(), first_n=1)
    assert list(res.layers) == ["0.1", "1", "3"] and res.averaged == ["0.1"]
    assert res.ratio == 0.25
    assert [m.training for m in net.modules()] == flags
    big = inhibited_channels(net, labelled_batches(), threshold=1e9, layers="0.1")
    assert big.ratio == 1.0
    with pytest.raises(ValueError, match="threshold"):
        inhibited_channels(net, labelled_batches(), threshold=-1)
    with pytest.raises(ValueError, match="no batch"):
        inhibited_channels(net, [])
