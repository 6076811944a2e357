"""The CE block's training step on an NCHW feature map as one autograd node.

The unfused block is three nodes over the feature map: the moments (per-sample means and mean
squares, group second moments), the small graph that turns them into the operator (covariance,
Newton iteration, IR gate, λ mixing) and the product Y_b = (W + Diag(d_b)) X_b. Its input
gradient then comes in two products, one through the product and one through the moments,
summed by autograd: two passes that write a feature map and a third that adds them. Here

    forward:  moments (one kernel pass) → small graph (ordinary autograd ops, kept) → product
    backward: dW, dd = Σ_n dY_b X_bᵀ and its diagonals (one pass); the small graph's backward
              (``torch.autograd.grad`` on the kept graph); then in one pass
              dX_b = (W + Diag(d_b))ᵀ dY_b + (S + Diag(2·dsq_b / M)) X_b + dmean_b / M,
              S = (dΣ + dΣᵀ) / (N·M)  (:func:`cenet.kernels.group_apply_pair`)

with the same numbers as the unfused graph. Only X and the small graph are kept for backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from cenet import kernels
from cenet.layers.moments import Moments

#: (moments) → (W (G, g, g), d (N, C) or None): the block's small graph, built with autograd.
Operator = Callable[[Moments], tuple[Tensor, Tensor | None]]


class _FusedGroupBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, groups: int, operator: Operator, shape: tuple[int, ...],
                *params: Tensor) -> Tensor:
        b, g, m = x.shape
        n = b // groups
        second, total, sq = kernels.group_second_moments(x, groups)
        leaves = (total.view(n, groups * g).div_(m), sq.view(n, groups * g).div_(m),
                  second.div_(n * m))
        for t in leaves:
            t.requires_grad_()
        with torch.enable_grad():
            wm, diag = operator(Moments(*leaves))
        ctx.save_for_backward(x)
        ctx.groups = groups
        ctx.graph = (leaves, wm, diag, params)
        d = None if diag is None else diag.detach().reshape(b, g)
        return kernels.group_apply(wm.detach().to(x.dtype), x, d, shape=shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        # The small graph stays with this node (a few KiB) and is kept by autograd.grad, so
        # that a graph run backward twice (retain_graph=True, gradcheck) works as unfused.
        leaves, wm, diag, params = ctx.graph
        b, g, m = x.shape
        groups = ctx.groups
        n = b // groups
        grad = grad.reshape(x.shape).to(x.dtype)
        grad_wm, grad_diag = kernels.group_gram(grad, x, groups, with_diag=diag is not None)
        outputs, grad_outputs = [wm], [grad_wm.to(wm.dtype)]
        if diag is not None:
            outputs.append(diag)
            grad_outputs.append(grad_diag.view(n, groups * g).to(diag.dtype))
        wanted = [p for p in params if p.requires_grad]
        grads = torch.autograd.grad(outputs, [*leaves, *wanted], grad_outputs, allow_unused=True,
                                    retain_graph=True)
        grad_mean, grad_sq, grad_second = (
            torch.zeros_like(leaf) if gr is None else gr
            for leaf, gr in zip(leaves, grads[:3], strict=True)
        )
        grad_x = None
        if ctx.needs_input_grad[0]:
            sym = (grad_second + grad_second.transpose(1, 2)).div_(n * m).to(x.dtype)
            d = None if diag is None else diag.detach().reshape(b, g)
            grad_x = kernels.group_apply_pair(
                wm.detach().to(x.dtype), grad, d, sym, x, grad_sq.reshape(b, g).mul(2 / m),
                grad_mean.reshape(b, g).div(m),
            )
        rest = iter(grads[3:])
        grad_params = (next(rest) if p.requires_grad else None for p in params)
        return (grad_x, None, None, None, *grad_params)


def fused_block_usable(x: Tensor, group_size: int) -> bool:
    """True if :func:`fused_group_block` takes ``x``: an NCHW-contiguous float32/float64 CPU
    tensor, groups the compiled kernels take, and the kernels built."""
    return x.is_contiguous() and kernels.kernels_usable(group_size, x)


def fused_group_block(x: Tensor, group_size: int, operator: Operator,
                      params: Sequence[Tensor]) -> Tensor:
    """y_n = (W + Diag(d_n)) x_n with (W, d) = operator(moments of x), as one autograd node.

    Args:
        x: (N, C, H, W) NCHW-contiguous input (see :func:`fused_block_usable`).
        group_size: g; C = G·g.
        operator: builds W (G, g, g) and d (N, C) or None from the :class:`Moments` of x with
            ordinary autograd ops (it may update running statistics).
        params: every tensor with ``requires_grad`` the operator uses (the module's
            parameters): their gradients are computed in backward.

    Returns:
        (N, C, H, W) tensor in ``x``'s dtype.

    Raises:
        Whatever ``operator`` raises (for example ``FloatingPointError`` for a non-finite
        covariance, before any running statistic changes).
    """
    n, c, h, w = x.shape
    groups = c // group_size
    return _FusedGroupBlock.apply(x.reshape(n * groups, group_size, h * w), groups, operator,
                                  (n, c, h, w), *params)
