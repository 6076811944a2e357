"""Cumulative ablation curves (Morcos et al. 2018): exact end points and nested drop sets."""

import copy
import json

import pytest
import torch
from analysis_nets import dead_channel_net, labelled_batches

from cenet.analysis import ablation_curve, channel_masks, evaluate_top1


def _top1_by_hand(net, batches):
    correct = sum(int((net(x).argmax(1) == y).sum()) for x, y in batches)
    return correct / sum(y.numel() for _, y in batches)


def test_r0_is_plain_evaluation_and_r1_zeroes_every_selected_channel():
    net = dead_channel_net(8, ())
    torch.manual_seed(1)
    with torch.no_grad():
        net[4].bias.copy_(torch.tensor([0.3, -0.2, 0.0]))  # all-zero features -> class 0
        net[4].weight.normal_()
    batches = labelled_batches(num=3, n=8, classes=3, seed=2)
    plain = evaluate_top1(net, batches)
    with torch.no_grad():
        assert plain == _top1_by_hand(net, batches)
        zeroed = copy.deepcopy(net)
        zeroed[0].weight.zero_()
        zeroed[0].bias.fill_(-1.0)  # every ReLU channel is 0 by hand
        hand_r1 = _top1_by_hand(zeroed, batches)
    assert hand_r1 == sum(int((y == 0).sum()) for _, y in batches) / 24
    curve = ablation_curve(net, batches, ratios=(0.0, 0.5, 1.0), repeats=3)
    for row in curve.accuracy:
        assert row[0] == plain and row[2] == hand_r1
    assert curve.num_channels == {"1": 8} and curve.std[0] == 0.0
    mean = curve.mean
    assert curve.area == pytest.approx(((mean[0] + mean[1]) / 2 + (mean[1] + mean[2]) / 2) / 2)
    assert plain != hand_r1  # the test can fail
    json.dumps(curve.to_dict())


def test_drop_sets_are_nested_and_importance_drops_dead_channels_first():
    gen = torch.Generator().manual_seed(0)
    orders = {"a": torch.randperm(10, generator=gen)}
    dropped = [set(torch.nonzero(channel_masks(orders, r / 10)["a"] == 0).flatten().tolist())
               for r in range(11)]
    assert [len(d) for d in dropped] == list(range(11))
    assert all(a < b for a, b in zip(dropped, dropped[1:], strict=False))
    # dropping the dead channels (least important) first changes nothing
    net = dead_channel_net(8, (0, 2, 3, 5))
    batches = labelled_batches()
    curve = ablation_curve(net, batches, ratios=(0.0, 0.5), order="importance", repeats=4)
    assert len(curve.accuracy) == 1 and curve.mean[0] == curve.mean[1]


def test_invalid_arguments():
    net, batches = dead_channel_net(), labelled_batches(num=1)
    with pytest.raises(ValueError, match="strictly increasing"):
        ablation_curve(net, batches, ratios=(0.5, 0.1))
    with pytest.raises(ValueError, match="unknown ablation order 'best'"):
        ablation_curve(net, batches, order="best")
    with pytest.raises(ValueError, match="needs \\(images, labels\\)"):
        evaluate_top1(net, [x for x, _ in batches])
