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

with the same numbers as the unfused graph. With ``pool`` (paper appendix G) the BD moments
come from the 2×2 max pooling X_s of X and the IR moments from X itself: the input gradient is
(W + Diag(d_b))ᵀ dY_b + Diag(2·dsq_b / M) X_b + dmean_b / M in one pass, plus the pooled
part (S + Diag(2·dsq_s / M_s)) X_s + dmean_s / M_s added back through the pooling's backward.
Only X (and X_s) and the small graph are kept for backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from cenet import kernels
from cenet.layers.moments import Moments

#: (BD moments, IR moments) → (W (G, g, g), d (N, C) or None): the block's small graph, built
#: with autograd. Without pooling both arguments are the same moments.
Operator = Callable[[Moments, Moments], tuple[Tensor, Tensor | None]]


#: where the small graph's parameters live: (module, name) with module.name a parameter
Slot = tuple[nn.Module, str]


class DirectOperator:
    """An operator with its own backward, in place of an :data:`Operator` built with autograd
    (no small graph is recorded; :mod:`cenet.layers.ce_operator`)."""

    def forward(self, bd_leaves: tuple[Tensor, ...], ir_leaves: tuple[Tensor, ...]
                ) -> tuple[Tensor, Tensor | None, tuple[Tensor, ...]]:
        """(W (G, g, g), d (N, C) or None, what backward needs) from the moments (the
        leaves of :func:`fused_group_block`: BD mean, mean square and second moment, then with
        ``pool`` the IR mean and mean square)."""
        raise NotImplementedError

    def backward(self, saved: tuple[Tensor, ...], grad_wm: Tensor, grad_diag: Tensor | None,
                 params: list[Tensor]) -> tuple[list[Tensor], list[Tensor | None]]:
        """The gradients of the leaves (all of them) and of ``params`` (the parameters at the
        slots, in order)."""
        raise NotImplementedError


def parameter_slots(module: nn.Module) -> list[Slot]:
    """Every parameter of ``module`` and its submodules as (owner module, attribute name),
    module by module: where :func:`fused_group_block` puts detached copies while the operator
    runs."""
    return [(m, name) for m in module.modules() for name, p in m._parameters.items()
            if p is not None]


@contextmanager
def _substituted(slots: list[Slot], tensors: list[Tensor]) -> Iterator[None]:
    """Run with ``tensors`` in place of the parameters at ``slots`` (restored after)."""
    saved = [owner._parameters[name] for owner, name in slots]
    try:
        for (owner, name), t in zip(slots, tensors, strict=True):
            owner._parameters[name] = t
        yield
    finally:
        for (owner, name), p in zip(slots, saved, strict=True):
            owner._parameters[name] = p


def _moment_leaves(x: Tensor, groups: int, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample means and mean squares (N, C) and second moments (G, g, g) of X (B, g, M)."""
    b, g, m = x.shape
    second, total, sq = kernels.group_second_moments(x, groups)
    return (total.view(n, groups * g).div_(m), sq.view(n, groups * g).div_(m),
            second.div_(n * m))


class _FusedGroupBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, groups: int, pool: bool, operator: Operator,
                shape: tuple[int, ...], slots: list[Slot], *params: Tensor) -> Tensor:
        b, g, m = x.shape
        n, c, h, w = shape
        xs = None
        if pool:
            xs = torch.ops.cenet_kernels.max_pool_2x2(x.view(n * c, h, w)).view(b, g, -1)
            bd_leaves = _moment_leaves(xs, groups, n)
            total, sq = kernels.row_moments(x.view(b * g, m))
            ir_leaves = (total.view(n, c).div_(m), sq.view(n, c).div_(m))
        else:
            bd_leaves = _moment_leaves(x, groups, n)
            ir_leaves = ()
        ctx.save_for_backward(x, xs)
        ctx.groups, ctx.shape = groups, shape
        if isinstance(operator, DirectOperator):
            wm, diag, saved = operator.forward(bd_leaves, ir_leaves)
            ctx.graph = (operator, saved, params)
            d = None if diag is None else diag.reshape(b, g)
            return kernels.group_apply(wm.to(x.dtype), x, d, shape=shape)
        leaves = bd_leaves + ir_leaves
        for t in leaves:
            t.requires_grad_()
        bd_moments = Moments(*bd_leaves)
        ir_moments = Moments(*ir_leaves, None) if pool else bd_moments
        # The small graph on detached copies of the parameters: hooks registered on the
        # parameters then fire once, when this node hands their gradients on, not also when
        # backward differentiates the small graph.
        copies = [p.detach().requires_grad_(p.requires_grad) for p in params]
        with torch.enable_grad(), _substituted(slots, copies):
            wm, diag = operator(bd_moments, ir_moments)
        ctx.graph = (leaves, wm, diag, copies)
        d = None if diag is None else diag.detach().reshape(b, g)
        return kernels.group_apply(wm.detach().to(x.dtype), x, d, shape=shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, xs = ctx.saved_tensors
        b, g, m = x.shape
        groups = ctx.groups
        n = b // groups
        grad = grad.reshape(x.shape).to(x.dtype)
        direct = isinstance(ctx.graph[0], DirectOperator)
        if direct:
            operator, saved, params = ctx.graph
            wm, diag = saved[0], saved[1]
        else:
            leaves, wm, diag, params = ctx.graph
        grad_wm, grad_diag = kernels.group_gram(grad, x, groups, with_diag=diag is not None)
        if grad_diag is not None:
            grad_diag = grad_diag.view(n, groups * g)
        if direct:
            grad_leaves, grad_params = operator.backward(saved, grad_wm, grad_diag, params)
        else:
            grad_leaves, grad_params = _graph_backward(leaves, wm, diag, params, grad_wm,
                                                       grad_diag)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(x, xs, grad, wm.detach(), diag, grad_leaves, groups, ctx.shape)
        return (grad_x, None, None, None, None, None, *grad_params)


def _graph_backward(leaves: list[Tensor], wm: Tensor, diag: Tensor | None, params: list[Tensor],
                    grad_wm: Tensor, grad_diag: Tensor | None
                    ) -> tuple[list[Tensor], list[Tensor | None]]:
    """The gradients of the moments (leaves) and parameters through the kept small graph.

    The graph stays with the node (a few KiB) and is kept by ``autograd.grad``, so that a
    graph run backward twice (retain_graph=True, gradcheck) works as unfused."""
    outputs, grad_outputs = [wm], [grad_wm.to(wm.dtype)]
    if diag is not None:
        outputs.append(diag)
        grad_outputs.append(grad_diag.to(diag.dtype))
    wanted = [p for p in params if p.requires_grad]
    grads = torch.autograd.grad(outputs, [*leaves, *wanted], grad_outputs, allow_unused=True,
                                retain_graph=True)
    grad_leaves = [torch.zeros_like(leaf) if gr is None else gr
                   for leaf, gr in zip(leaves, grads[: len(leaves)], strict=True)]
    rest = iter(grads[len(leaves):])
    return grad_leaves, [next(rest) if p.requires_grad else None for p in params]


def _symmetrized(grad_second: Tensor, count: int, dtype: torch.dtype) -> Tensor:
    """d/dX of Σ_n X Xᵀ / count through its gradient: (dΣ + dΣᵀ) / count."""
    return (grad_second + grad_second.transpose(1, 2)).div_(count).to(dtype)


def _input_grad(x: Tensor, xs: Tensor | None, grad: Tensor, wm: Tensor, diag: Tensor | None,
                grad_leaves: list[Tensor], groups: int, shape: tuple[int, ...]) -> Tensor:
    b, g, m = x.shape
    n = b // groups
    d = None if diag is None else diag.detach().reshape(b, g)
    wm = wm.to(x.dtype)
    if xs is None:
        grad_mean, grad_sq, grad_second = grad_leaves
        return kernels.group_apply_pair(
            wm, grad, d, _symmetrized(grad_second, n * m, x.dtype), x,
            grad_sq.reshape(b, g).mul(2 / m), grad_mean.reshape(b, g).div(m),
        )
    grad_mean_s, grad_sq_s, grad_second_s, grad_mean, grad_sq = grad_leaves
    grad_x = kernels.group_apply_pair(
        wm, grad, d, None, x, grad_sq.reshape(b, g).mul(2 / m), grad_mean.reshape(b, g).div(m)
    )
    ms = xs.shape[2]
    grad_xs = kernels.group_apply(
        _symmetrized(grad_second_s, n * ms, x.dtype), xs, grad_sq_s.reshape(b, g).mul(2 / ms),
        grad_mean_s.reshape(b, g).div(ms),
    )
    _, c, h, w = shape
    torch.ops.cenet_kernels.max_pool_2x2_backward(
        x.view(n * c, h, w), grad_xs.view(n * c, h // 2, w // 2), True, grad_x.view(n * c, h, w)
    )
    return grad_x


def fused_block_usable(x: Tensor, group_size: int, pool: bool = False) -> bool:
    """True if :func:`fused_group_block` takes ``x``: an NCHW-contiguous float32/float64 CPU
    tensor, groups the compiled kernels take, the kernels built, and with ``pool`` a map of at
    least 2×2."""
    if pool and (x.shape[-1] < 2 or x.shape[-2] < 2):
        return False
    return x.is_contiguous() and kernels.kernels_usable(group_size, x)


def fused_group_block(x: Tensor, group_size: int, operator: Operator | DirectOperator,
                      slots: list[Slot], *, pool: bool = False) -> Tensor:
    """y_n = (W + Diag(d_n)) x_n with (W, d) = operator(moments of x), as one autograd node.

    Args:
        x: (N, C, H, W) NCHW-contiguous input (see :func:`fused_block_usable`).
        group_size: g; C = G·g.
        operator: builds W (G, g, g) and d (N, C) or None from the :class:`Moments` of the BD
            statistics and of x (the IR statistics: ``second`` is None with ``pool``) with
            ordinary autograd ops (it may update running statistics), or a
            :class:`DirectOperator` that computes its own backward.
        slots: where the parameters the operator uses live (:func:`parameter_slots` of the
            module): the operator runs with detached copies in their place, and their
            gradients are computed in backward.
        pool: the BD moments come from 2×2 max pooling of x (paper appendix G).

    Returns:
        (N, C, H, W) tensor in ``x``'s dtype.

    Raises:
        Whatever ``operator`` raises (for example ``FloatingPointError`` for a non-finite
        covariance, before any running statistic changes).
    """
    n, c, h, w = x.shape
    groups = c // group_size
    params = [owner._parameters[name] for owner, name in slots]
    return _FusedGroupBlock.apply(x.reshape(n * groups, group_size, h * w), groups, pool,
                                  operator, (n, c, h, w), slots, *params)
