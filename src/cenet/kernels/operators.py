"""The CE block's native CPU operators as typed, traceable ``torch.library`` custom ops.

Three ops, each with a fake (meta) implementation for ``torch.compile``/``torch.export`` and a
FLOP formula for ``torch.utils.flop_counter``:

- ``cenet::ce_train``: the ``"ce"``-mode training step on an NCHW map without pooling:
  per-sample moments and group second moments in one pass, the operator (covariance, trace
  normalization, Newton iteration; instance variances, gate, batch scale; λ mixing; CE paper
  Eqns 4-8, 21), and p_n = (λW + (1 − λ)Diag(d_n)) x_n in a second pass;
- ``cenet::ce_train_backward``: its backward (one gram pass, the operator's hand-derived
  backward, one pass for the input gradient), registered as ``ce_train``'s autograd formula;
- ``cenet::ce_eval``: the eval block, p_n = (W + Diag(d_n)) x_n with d_n from x_n's
  variances, one pass per few samples (no autograd: call under ``torch.no_grad``).

They run the kernels of the instruction set :func:`cenet.kernels.active_isa` names, take
NCHW or channels-last maps and return map outputs (also the input gradient) in the input's
layout; the named wrappers :func:`ce_train` and :func:`ce_eval` return typed results. The
same maths in PyTorch is :mod:`cenet.layers.functional`, the reference these ops are tested
against.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from cenet import kernels

__all__ = ["TrainStep", "ce_eval", "ce_train"]

# ce_step returns Y, then these (see ce_step.cpp); SAVED_NAMES index the list without Y.
_SAVED_NAMES = ("mean", "wm_mixed", "d_mixed", "wm", "inv_std", "finite", "sn", "trace", "mu",
                "raw", "var", "xhat", "rstd", "hidden", "gate", "lam", "ps")
_WM, _INV_STD, _FINITE = (_SAVED_NAMES.index(k) for k in ("wm", "inv_std", "finite"))


class TrainStep(NamedTuple):
    """Result of :func:`ce_train`.

    Attributes:
        output: (N, C, H, W) p, in the input's layout.
        wm: (G, g, g) the batch's whitening matrix W (before λ), for the running estimate.
        inv_std: (1,) the batch's IR scale (s + ε)^{-1/2}, for the running estimate.
        finite: () bool, the batch covariance and scale are finite.
    """

    output: Tensor
    wm: Tensor
    inv_std: Tensor
    finite: Tensor


def _layout(x: Tensor) -> torch.memory_format:
    """The memory format of ``x`` (N, C, H, W): channels-last, or NCHW-contiguous. The ops take
    both: the kernels read an NCHW copy of a channels-last map, and the ops return their map
    outputs (the output, the input gradient) in the input's layout, so that the layers around
    the block keep theirs."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


@torch.library.custom_op("cenet::ce_train", mutates_args=(), device_types="cpu")
def _ce_train_op(x: Tensor, theta: Tensor, fc1: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                 fc2: Tensor, group_size: int, num_iters: int, eps_bd: float, eps_ir: float,
                 ln_eps: float) -> list[Tensor]:
    out = list(kernels.ops().ce_step(x.contiguous(), group_size, theta, fc1, ln_weight, ln_bias,
                                     fc2, eps_bd, eps_ir, ln_eps, num_iters))
    out[0] = out[0].contiguous(memory_format=_layout(x))
    # outputs may not alias each other: W is the last Newton iterate, a view of P_1..P_T
    out[1 + _WM] = out[1 + _WM].clone()
    return out


@_ce_train_op.register_fake
def _(x, theta, fc1, ln_weight, ln_bias, fc2, group_size, num_iters, eps_bd, eps_ir, ln_eps):
    n, c = x.shape[0], x.shape[1]
    groups, hidden = c // group_size, fc1.shape[0]
    mat = (groups, group_size, group_size)
    shapes = {"mean": (n, c), "wm_mixed": mat, "d_mixed": (n, c), "wm": mat, "inv_std": (1,),
              "sn": mat, "trace": (groups,), "mu": (groups, group_size, 1), "raw": (n, c),
              "var": (n, c), "xhat": (n, hidden), "rstd": (n, 1), "hidden": (n, hidden),
              "gate": (n, c), "lam": (1,), "ps": (num_iters, *mat)}
    saved = [x.new_empty((), dtype=torch.bool) if k == "finite" else x.new_empty(shapes[k])
             for k in _SAVED_NAMES]
    return [torch.empty_like(x, memory_format=_layout(x)), *saved]


@torch.library.custom_op("cenet::ce_train_backward", mutates_args=(), device_types="cpu")
def _ce_train_backward_op(grad: Tensor, x: Tensor, fc1: Tensor, ln_weight: Tensor, fc2: Tensor,
                          saved: list[Tensor]) -> list[Tensor]:
    out = list(kernels.ops().ce_step_backward(grad.contiguous(), x.contiguous(), fc1, ln_weight,
                                              fc2, saved))
    out[0] = out[0].contiguous(memory_format=_layout(x))
    return out


@_ce_train_backward_op.register_fake
def _(grad, x, fc1, ln_weight, fc2, saved):
    return [torch.empty_like(x, memory_format=_layout(x)), x.new_empty(1),
            torch.empty_like(fc1), torch.empty_like(ln_weight), torch.empty_like(ln_weight),
            torch.empty_like(fc2)]


def _setup_train(ctx, inputs, output) -> None:
    x, theta, fc1, ln_weight, ln_bias, fc2 = inputs[:6]
    ctx.save_for_backward(x, fc1, ln_weight, fc2, *output[1:])


def _train_backward(ctx, grads):
    x, fc1, ln_weight, fc2, *saved = ctx.saved_tensors
    grad = grads[0] if grads[0] is not None else torch.zeros_like(x)
    grad_x, *grad_params = torch.ops.cenet.ce_train_backward(grad, x, fc1, ln_weight, fc2, saved)
    return (grad_x, *grad_params, None, None, None, None, None)


_ce_train_op.register_autograd(_train_backward, setup_context=_setup_train)


NHWC_GROUP_SIZES = (16, 32, 64)
"""Group sizes the channels-last eval kernel takes (a register tile each, on every ISA); other
channels-last inputs go through the NCHW kernel with a layout copy each way, which is faster
than a channels-last loop over groups narrower than a vector (10-30x at ShuffleNetV2's g = 2-8)."""


@torch.library.custom_op("cenet::ce_eval", mutates_args=(), device_types="cpu")
def _ce_eval_op(x: Tensor, wm: Tensor | None, fc1: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                fc2: Tensor, scale: Tensor, group_size: int, ln_eps: float) -> Tensor:
    n, c, h, w = x.shape
    wm = x.new_empty(0) if wm is None else wm
    layout = _layout(x)
    if layout == torch.channels_last and group_size in NHWC_GROUP_SIZES:  # no layout copy
        out = torch.empty_like(x, memory_format=torch.channels_last)
        kernels.ops().ce_eval_nhwc(x.permute(0, 2, 3, 1).view(n, h * w, c), wm, fc1, ln_weight,
                                   ln_bias, ln_eps, fc2, scale, group_size,
                                   out.permute(0, 2, 3, 1).view(n, h * w, c))
        return out
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    kernels.ops().ce_eval(x.contiguous().view(n, c, h * w), wm, fc1, ln_weight, ln_bias, ln_eps,
                          fc2, scale, group_size, out)
    return out.contiguous(memory_format=layout)


@_ce_eval_op.register_fake
def _(x, wm, fc1, ln_weight, ln_bias, fc2, scale, group_size, ln_eps):
    return torch.empty_like(x, memory_format=_layout(x))


def ce_train(x: Tensor, theta: Tensor, fc1: Tensor, ln_weight: Tensor, ln_bias: Tensor,
             fc2: Tensor, *, group_size: int, num_iters: int, eps_bd: float, eps_ir: float,
             ln_eps: float) -> TrainStep:
    """The ``"ce"``-mode training step of a CE block (no pooling) with the native kernels.

    Args:
        x: (N, C, H, W) float32/float64 CPU tensor, NCHW or channels-last.
        theta: (1,) θ of λ = sigmoid(θ). fc1: (C/r, C), ln_weight, ln_bias: (C/r,),
            fc2: (C, C/r): the IR gate's weights. All in ``x``'s dtype.
        group_size: g (at most 64), num_iters: T, eps_bd/eps_ir: ε of BD and IR, ln_eps: ε of
            the gate's LayerNorm.

    Returns:
        :class:`TrainStep`; differentiable in ``x`` and the weights.

    Raises:
        RuntimeError: if the kernels are not loaded, or for shapes and dtypes that do not fit.
    """
    out = torch.ops.cenet.ce_train(x, theta, fc1, ln_weight, ln_bias, fc2, group_size, num_iters,
                                   eps_bd, eps_ir, ln_eps)
    saved = out[1:]
    return TrainStep(out[0], saved[_WM], saved[_INV_STD], saved[_FINITE])


def ce_eval(x: Tensor, wm: Tensor | None, fc1: Tensor, ln_weight: Tensor, ln_bias: Tensor,
            fc2: Tensor, scale: Tensor, *, group_size: int, ln_eps: float) -> Tensor:
    """The eval-mode CE block with the native kernel (CE paper, Eqns 4, 7, 8, 21).

    p_n = (W + Diag(d_n)) x_n, d_n = scale · Sigmoid(fc2 ReLU(LN(fc1 σ̃²_n))), σ̃²_n the
    population variances of sample n's channels; the caller folds λ into W and
    (1 − λ)·ŝ^{-1/2} into ``scale``. No autograd.

    Args:
        x: (N, C, H, W) float32/float64 CPU tensor, NCHW or channels-last.
        wm: (G, g, g) or None (IR only). fc1 (C/r, C), ln_weight, ln_bias (C/r,), fc2
            (C, C/r), scale (1,): in ``x``'s dtype.

    Returns:
        (N, C, H, W) in ``x``'s layout.
    """
    return torch.ops.cenet.ce_eval(x, wm, fc1, ln_weight, ln_bias, fc2, scale, group_size,
                                   ln_eps)


# FLOP formulas (2 per multiply-add, as torch.utils.flop_counter counts matmuls): the passes
# over the map, the Newton iteration's g×g products, the gate's layers.
def _operator_flops(n: int, c: int, hidden: int, g: int, iters: int, backward: bool) -> int:
    groups = c // g
    newton = (iters - 1) * (8 if backward else 3) * 2 * groups * g**3
    return 2 * groups * g * g + newton + (4 if backward else 2) * 2 * n * c * hidden


@register_flop_formula(torch.ops.cenet.ce_train)
def _(x_shape, theta, fc1_shape, ln_w, ln_b, fc2, group_size, num_iters, *args, **kwargs) -> int:
    n, c, h, w = x_shape
    passes = 2 * (2 * n * c * group_size * h * w)  # moments and output
    return passes + _operator_flops(n, c, fc1_shape[0], group_size, num_iters, False)


@register_flop_formula(torch.ops.cenet.ce_train_backward)
def _(grad, x_shape, fc1_shape, ln_w, fc2, saved_shapes, *args, **kwargs) -> int:
    n, c, h, w = x_shape
    iters, _, g, _ = saved_shapes[-1]
    passes = 3 * (2 * n * c * g * h * w)  # gram and the input gradient's two products
    return passes + _operator_flops(n, c, fc1_shape[0], g, iters, True)


@register_flop_formula(torch.ops.cenet.ce_eval)
def _(x_shape, wm, fc1_shape, ln_w, ln_b, fc2, scale, group_size, *args, **kwargs) -> int:
    n, c, h, w = x_shape
    return 2 * n * c * group_size * h * w + 2 * n * 2 * c * fc1_shape[0]
