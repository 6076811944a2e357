"""Small hand-built networks whose measurements are known."""

import torch
from torch import nn


def dead_channel_net(channels: int = 8, dead: tuple[int, ...] = (1, 4, 6)) -> nn.Sequential:
    """conv(3 -> C)-ReLU-GAP-linear(C -> 3) whose ``dead`` output channels have zero weights and
    bias -1, so their ReLU output is exactly 0; the other channels have bias +1 and positive
    weights, so on inputs in [0, 1) their mean is at least 1."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 3),
    )
    with torch.no_grad():
        net[0].weight.uniform_(0, 0.1)
        net[0].bias.fill_(1.0)
        net[0].weight[list(dead)] = 0
        net[0].bias[list(dead)] = -1.0
    return net


def labelled_batches(num: int = 3, n: int = 4, size: int = 8, classes: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.rand(n, 3, size, size, generator=gen), torch.randint(classes, (n,), generator=gen))
        for _ in range(num)
    ]
