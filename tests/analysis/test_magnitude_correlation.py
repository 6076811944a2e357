"""Channel magnitude map (CE paper Fig. 3) and channel correlation (Fig. 5) by hand."""

import math

import pytest
import torch
from torch import nn

from cenet.analysis import (
    CorrelationRecorder,
    channel_correlation,
    channel_correlations,
    channel_magnitude_map,
    magnitude_map,
)


def test_magnitude_map_of_hand_set_features_and_through_a_model():
    x = torch.zeros(2, 2, 2, 3)
    x[0, 0, 0, 0], x[0, 1, 0, 0] = 3.0, 4.0  # norm 5 at (0, 0) in sample 0
    x[1, 0, 1, 2] = -2.0  # norm 2 at (1, 2) in sample 1
    expected = torch.zeros(2, 3)
    expected[0, 0], expected[1, 2] = 2.5, 1.0
    torch.testing.assert_close(magnitude_map(x), expected)
    net = nn.Sequential(nn.Identity(), nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    net.train()
    out = channel_magnitude_map(net, x, layer=nn.Identity)
    torch.testing.assert_close(out, expected)
    assert net.training and net[2].training
    with pytest.raises(ValueError, match="expects an \\(N, C, H, W\\)"):
        magnitude_map(torch.zeros(2, 3))


def test_correlated_vs_independent_channels_and_constant_channels():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(64, 1, 16, 16, generator=gen)
    same = torch.cat([a, -2 * a + 1, 3 * a], 1)
    assert channel_correlation(same) == pytest.approx(1.0, abs=1e-9)
    indep = torch.randn(64, 4, 16, 16, generator=gen)
    assert channel_correlation(indep) < 0.02
    # a constant (dead) channel is excluded, never NaN
    with_dead = torch.cat([same, torch.zeros(64, 1, 16, 16)], 1)
    assert channel_correlation(with_dead) == pytest.approx(1.0, abs=1e-9)
    assert channel_correlation(torch.ones(4, 3, 2, 2)) == 0.0
    # two channels by hand: Pearson r of x and x² on {1, 2, 3} (means 2 and 14/3)
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    r = ((x - 2) * (x**2 - 14 / 3)).sum() / math.sqrt(2 * ((x**2 - 14 / 3) ** 2).sum())
    feats = torch.stack([x, x**2], 1)  # (N=3, C=2)
    assert channel_correlation(feats) == pytest.approx(r.item(), rel=1e-9)


def test_streaming_over_batches_and_recorder():
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 5, 5, generator=gen) for _ in range(3)]
    net = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU())
    streamed = channel_correlations(net, batches)
    with torch.no_grad():
        whole = channel_correlation(net(torch.cat(batches)))
    assert streamed == {"1": pytest.approx(whole, rel=1e-9)}
    rec = CorrelationRecorder(layers="1")
    for step in (0, 10):
        rec(net, batches[0], step=step)
    assert rec.to_dict()["1"]["step"] == [0, 10]
    assert rec.history["1"][0][1] == rec.history["1"][1][1]
