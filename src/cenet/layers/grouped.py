"""Applying a group-wise (block-diagonal) channel transform: the output step of BD and CE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cenet import kernels
from cenet.layers.moments import is_channels_last


class _GroupApply(torch.autograd.Function):
    """Y_b = (W_{b mod G} + Diag(d_b)) X_b for the B = N·G channel groups X (B, g, M).

    Backward: dX_b = (W_{b mod G}ᵀ + Diag(d_b)) dY_b, and dW, dd from Σ_n dY_b X_bᵀ and its
    per-sample diagonals: two passes of the compiled kernels (:mod:`cenet.kernels`); the
    per-sample matrices W + Diag(d_b) are never formed.
    """

    @staticmethod
    def forward(ctx, x: Tensor, wm: Tensor, diag: Tensor | None, shape: tuple[int, ...]):
        ctx.save_for_backward(x, wm, diag)
        # Allocated in the output shape: a view would make an in-place ReLU on the output
        # rebase the graph through AsStridedBackward (a zero-filled copy of the feature map).
        return kernels.group_apply(wm, x, diag, shape=shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, wm, diag = ctx.saved_tensors
        grad = grad.reshape(x.shape)
        grad_x = grad_wm = grad_diag = None
        if ctx.needs_input_grad[0]:
            grad_x = kernels.group_apply(wm, grad, diag, transpose=True)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_wm, grad_diag = kernels.group_gram(
                grad, x, wm.shape[0], with_diag=ctx.needs_input_grad[2]
            )
        return grad_x, grad_wm, grad_diag, None


def group_conv_weight(wm: Tensor) -> Tensor:
    """Block-diagonal matrices (G, g, g) as the weight (C, g, 1, 1) of a grouped 1×1 conv."""
    groups, g, _ = wm.shape
    return wm.reshape(groups * g, g, 1, 1)


def apply_group_transform(x: Tensor, wm: Tensor, diag: Tensor | None = None) -> Tensor:
    """y_n = (W + Diag(d_n)) x_n at every position: a grouped 1×1 conv plus a per-sample scale.

    W is block-diagonal with G blocks (G, g, g) shared by the batch; ``diag`` holds one
    diagonal per sample (N, C) (the IR branch, CE paper Eqn 8), or is ``None``. For NCHW input
    this is one pass of the compiled group kernel (:mod:`cenet.kernels`); for channels-last
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
    if diag is not None:
        diag = diag.to(x.dtype).reshape(n * groups, g)
    return _GroupApply.apply(x.reshape(n * groups, g, h * w), wm, diag, (n, c, h, w))
