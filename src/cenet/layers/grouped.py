"""Applying a group-wise (block-diagonal) channel transform: the output step of BD and CE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cenet.layers.moments import is_channels_last


def group_conv_weight(wm: Tensor) -> Tensor:
    """Block-diagonal matrices (G, g, g) as the weight (C, g, 1, 1) of a grouped 1×1 conv."""
    groups, g, _ = wm.shape
    return wm.reshape(groups * g, g, 1, 1)


def apply_group_transform(x: Tensor, wm: Tensor, diag: Tensor | None = None) -> Tensor:
    """y_n = (W + Diag(d_n)) x_n at every position: a grouped 1×1 conv plus a per-sample scale.

    W is block-diagonal with G blocks (G, g, g) shared by the batch; ``diag`` holds one
    diagonal per sample (N, C) (the IR branch, CE paper Eqn 8), or is ``None``. For NCHW input
    this is one batched product with the per-sample matrices W + Diag(d_n); for channels-last
    input a grouped 1×1 convolution (fast in NHWC) and one fused multiply-add. The output has
    the input's memory layout.

    Args:
        x: (N, C, H, W) input, NCHW or channels-last.
        wm: (G, g, g) group matrices, G·g = C.
        diag: (N, C) per-sample diagonal, or None.

    Returns:
        (N, C, H, W) tensor in ``x``'s dtype.
    """
    n, c, h, w = x.shape
    groups, g, _ = wm.shape
    wm = wm.to(x.dtype)
    if is_channels_last(x):
        out = F.conv2d(x, group_conv_weight(wm), groups=groups)
        if diag is not None:
            out = torch.addcmul(out, x, diag.to(x.dtype)[:, :, None, None])
        return out
    if diag is None:
        return torch.matmul(wm, x.reshape(n, groups, g, h * w)).view(n, c, h, w)
    mats = torch.diag_embed(diag.to(x.dtype).view(n, groups, g)) + wm
    out = torch.bmm(mats.view(n * groups, g, g), x.reshape(n * groups, g, h * w))
    return out.view(n, c, h, w)
