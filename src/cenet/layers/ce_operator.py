"""The CE block's training step with compiled code and hand-derived backwards.

The operator (λ·W, (1 − λ)·d) from the moments gives the same numbers as the autograd path of
``ChannelEquilibrium._batch_operator`` (covariance, trace normalization and Newton iteration
of BD, CE paper Eqns 5-6; variances, gate MLP and scale of IR, Eqns 7, 8, 21; λ mixing,
Eqn 4), computed by ``torch.ops.cenet_kernels.ce_operator`` and ``ce_operator_backward``
(``cenet/kernels/ce_operator.cpp``): no small graph of about 100 autograd nodes, whose
dispatch dominates the block's training step at small maps.

- :func:`compiled_step`: without pooling, the whole step (moments, operator, product, and in
  backward the gram pass, the operator's backward and the input gradient) is two compiled ops
  (``cenet/kernels/ce_step.cpp``) under one autograd node.
- :class:`CompiledCEOperator`: with pooling (paper appendix G), the operator inside
  :func:`~cenet.layers.fused_block.fused_group_block`.

:class:`~cenet.layers.ChannelEquilibrium` uses them where :func:`compiled_operator_usable`
says so. Both check that the batch statistics are finite before they update the running
estimates, as the autograd operator does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from cenet import kernels
from cenet.layers.batch_decorrelation import BatchDecorrelation
from cenet.layers.fused_block import DirectOperator
from cenet.layers.instance_reweighting import InstanceReweighting
from cenet.layers.moments import is_channels_last


class CompiledCEOperator(DirectOperator):
    """The ``"ce"``-mode operator of ``block`` (a :class:`~cenet.layers.ChannelEquilibrium`)
    for :func:`~cenet.layers.fused_block.fused_group_block`: (λ·W (G, g, g), (1 − λ)·d (N, C))
    from the BD and IR moments, updating ``bd.running_wm`` and ``ir.running_inv_std``
    (Eqn 32), and its backward.

    Raises (in forward):
        FloatingPointError: if the covariance or the IR scale is not finite; no running
            estimate changes then.
    """

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def _weights(self) -> tuple[Tensor, ...]:
        ir = self.block.ir
        return (self.block.theta, ir.fc1.weight, ir.norm.weight, ir.norm.bias, ir.fc2.weight)

    def forward(self, bd_leaves, ir_leaves):
        bd, ir = self.block.bd, self.block.ir
        mean_bd, _, second = bd_leaves
        mean_ir, sq_ir = ir_leaves if ir_leaves else bd_leaves[:2]
        with torch.no_grad():
            out = torch.ops.cenet_kernels.ce_operator(
                mean_bd, second, mean_ir, sq_ir, *self._weights(), bd.eps, ir.eps, ir.norm.eps,
                bd.num_iters,
            )
        wm_mixed, d_mixed = out[:2]
        _check_and_update(self.block, *out[2:5])
        return wm_mixed, d_mixed, (*out, mean_ir, len(bd_leaves) + len(ir_leaves))

    def backward(self, saved, grad_wm, grad_diag, params):
        *out, mean_ir, num_leaves = saved
        _, fc1, ln_w, _, fc2 = self._weights()
        # (grad_diag: never None, the operator always has an IR diagonal; both gradients come
        # from group_gram, contiguous and in the operator's dtype)
        (grad_mean_bd, grad_second, grad_mean_ir, grad_sq_ir,
         *grad_weights) = torch.ops.cenet_kernels.ce_operator_backward(
            grad_wm, grad_diag, mean_ir, fc1, ln_w, fc2, out
        )
        if num_leaves == 3:  # one set of moments: the IR statistics are the BD ones
            grad_leaves = [grad_mean_bd + grad_mean_ir, grad_sq_ir, grad_second]
        else:
            grad_leaves = [grad_mean_bd, torch.zeros_like(grad_sq_ir), grad_second, grad_mean_ir,
                           grad_sq_ir]
        by_id = {id(w): gw for w, gw in zip(self._weights(), grad_weights, strict=True)}
        return grad_leaves, [by_id[id(p)] if p.requires_grad else None for p in params]


class _CompiledCEStep(torch.autograd.Function):
    """The whole training step of a ``"ce"``-mode block on an NCHW map without pooling:
    moments, operator and product in one compiled op, their backward in another
    (``cenet/kernels/ce_step.cpp``); the same numbers as
    :func:`~cenet.layers.fused_block.fused_group_block` with :class:`CompiledCEOperator`."""

    @staticmethod
    def forward(ctx, x: Tensor, block: nn.Module, theta: Tensor, fc1: Tensor, ln_w: Tensor,
                ln_b: Tensor, fc2: Tensor) -> Tensor:
        bd, ir = block.bd, block.ir
        # A channels-last map is copied to NCHW for the kernels, and the output and the input
        # gradient back to channels-last (a gradient in the other layout would slow down the
        # layers around the block).
        ctx.channels_last = is_channels_last(x)
        x = x.contiguous()
        out = torch.ops.cenet_kernels.ce_step(
            x, bd.group_size, theta, fc1, ln_w, ln_b, fc2, bd.eps, ir.eps, ir.norm.eps,
            bd.num_iters,
        )
        _check_and_update(block, *out[4:7])
        ctx.save_for_backward(x, fc1, ln_w, fc2)
        ctx.saved = out[1:]  # all but the output: the moments' means and the operator's
        return out[0].contiguous(memory_format=_layout(ctx.channels_last))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, fc1, ln_w, fc2 = ctx.saved_tensors
        grad_x, *grads = torch.ops.cenet_kernels.ce_step_backward(
            grad.to(x.dtype), x, fc1, ln_w, fc2, ctx.saved
        )
        grad_x = grad_x.contiguous(memory_format=_layout(ctx.channels_last))
        return (grad_x if ctx.needs_input_grad[0] else None, None,
                *(gr if need else None
                  for gr, need in zip(grads, ctx.needs_input_grad[2:], strict=True)))


def _layout(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _check_and_update(block: nn.Module, wm: Tensor, inv_std: Tensor, finite: Tensor) -> None:
    """Raise for non-finite batch statistics, else update the running estimates (Eqn 32)."""
    bd, ir = block.bd, block.ir
    if not finite:
        raise FloatingPointError(
            "ChannelEquilibrium: the batch statistics are not finite (NaN/Inf in the "
            "input); the running estimates were not updated"
        )
    with torch.no_grad():
        bd.running_wm.lerp_(wm.to(bd.running_wm.dtype), bd.momentum)
        ir.running_inv_std.lerp_(inv_std.to(ir.running_inv_std.dtype), ir.momentum)


def compiled_step(block: nn.Module, x: Tensor) -> Tensor:
    """The training step of ``block`` (a ``"ce"``-mode
    :class:`~cenet.layers.ChannelEquilibrium` without pooling) on ``x`` (N, C, H, W), NCHW or
    channels-last (copied to NCHW and back), where :func:`compiled_operator_usable` holds;
    updates the running estimates. The output has the input's layout.

    Raises:
        FloatingPointError: if the batch statistics are not finite (nothing is updated).
    """
    ir = block.ir
    return _CompiledCEStep.apply(x, block, block.theta, ir.fc1.weight, ir.norm.weight,
                                 ir.norm.bias, ir.fc2.weight)


def compiled_operator_usable(block: nn.Module, x: Tensor) -> bool:
    """True if :class:`CompiledCEOperator` computes the operator of ``block`` (a ``"ce"``-mode
    :class:`~cenet.layers.ChannelEquilibrium`) on ``x``: the compiled kernels built, ``x`` and
    the parameters of one float32/float64 dtype on the CPU, and the branches as
    :class:`~cenet.layers.BatchDecorrelation` and :class:`~cenet.layers.InstanceReweighting`
    build them (a subclass that changes a step of the operator keeps the autograd path)."""
    ir, bd = block.ir, block.bd
    if (type(bd).whitening_matrix is not BatchDecorrelation.whitening_matrix
            or type(ir).channel_scale is not InstanceReweighting.channel_scale
            or type(ir).gate is not InstanceReweighting.gate):
        return False
    if not (type(ir.fc1) is nn.Linear and type(ir.fc2) is nn.Linear
            and type(ir.norm) is nn.LayerNorm and ir.norm.weight is not None
            and ir.norm.bias is not None and ir.fc1.bias is None and ir.fc2.bias is None):
        return False
    return kernels.kernels_usable(bd.group_size, x, block.theta, ir.fc1.weight, ir.norm.weight,
                                  ir.norm.bias, ir.fc2.weight)
