"""The tensor maths of inference fusion: fold an eval-time affine channel map into the
convolution before it (pure functions, no modules; the module pass is
:mod:`cenet.deploy.fused_model`).

An eval-time BatchNorm, BD branch (CE paper §3.1: "BD can be merged into the convolutional
layers"; appendix E), IterNorm or DBN is the same kind of map on the conv's output y:

    z = M y + c,   M block-diagonal with G blocks of g × g,  c ∈ R^C

so conv → map is one convolution with weight M·W (mixing output channels) and bias M·b + c.
BatchNorm is the case g = 1; torch's ``torch.nn.utils.fusion.fuse_conv_bn_weights`` covers it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def fuse_conv_affine_weights(
    conv_w: Tensor,
    conv_b: Tensor | None,
    matrix: Tensor,
    shift: Tensor | None = None,
    *,
    conv_groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Weight and bias of ``conv`` followed by ``z = blockdiag(matrix) · y + shift``.

    Computed in float64 and returned in ``conv_w``'s dtype.

    Args:
        conv_w: (C, C_in / groups, kH, kW) convolution weight.
        conv_b: (C,) bias or None (zero).
        matrix: (G, g, g) blocks of the map, G·g = C (g = 1: a per-channel scale).
        shift: (C,) added after the map, or None.
        conv_groups: the convolution's ``groups``; each block of g output channels must lie
            within one convolution group (g divides C / conv_groups).

    Returns:
        ``(weight (C, C_in / groups, kH, kW), bias (C,))``.

    Raises:
        ValueError: if the shapes do not fit, or a block straddles two convolution groups.
    """
    c = conv_w.shape[0]
    if matrix.dim() != 3 or matrix.shape[1] != matrix.shape[2]:
        raise ValueError(f"matrix must be (G, g, g), got {tuple(matrix.shape)}")
    groups, g = matrix.shape[0], matrix.shape[1]
    if groups * g != c:
        raise ValueError(f"matrix {tuple(matrix.shape)} does not cover the conv's {c} outputs")
    if (c // conv_groups) % g:
        raise ValueError(
            f"blocks of {g} output channels straddle the convolution's groups of "
            f"{c // conv_groups} channels; such a map cannot be folded into a grouped convolution"
        )
    for name, t in (("conv_b", conv_b), ("shift", shift)):
        if t is not None and t.shape != (c,):
            raise ValueError(f"{name} must be ({c},), got {tuple(t.shape)}")
    m = matrix.double()
    w = conv_w.double().reshape(groups, g, -1)
    weight = torch.bmm(m, w).reshape(conv_w.shape)
    bias = torch.zeros(c, dtype=torch.float64, device=conv_w.device)
    if conv_b is not None:
        bias = torch.bmm(m, conv_b.double().reshape(groups, g, 1)).reshape(c)
    if shift is not None:
        bias = bias + shift.double()
    return weight.to(conv_w.dtype), bias.to(conv_w.dtype)


def fuse_conv_bd_weights(
    conv_w: Tensor, conv_b: Tensor | None, bd_matrix: Tensor, *, conv_groups: int = 1
) -> tuple[Tensor, Tensor]:
    """Fold the eval-time BD branch, the grouped 1×1 map ``bd_matrix`` (G, g, g) (its running
    whitening matrix, scaled by λ where the caller mixes), into the convolution before it
    (CE paper §3.1 and appendix E). See :func:`fuse_conv_affine_weights`."""
    return fuse_conv_affine_weights(conv_w, conv_b, bd_matrix, None, conv_groups=conv_groups)


def whitening_affine(
    running_mean: Tensor, running_wm: Tensor, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The eval-time map of IterNorm/DBN, z = γ ⊙ W (y − μ) + β, as ``(matrix, shift)``:
    matrix = Diag(γ) W (G, g, g) and shift = β − γ ⊙ W μ (C,)."""
    groups, g, _ = running_wm.shape
    wm = running_wm.double()
    mu = running_mean.double().reshape(groups, g, 1)
    wmu = torch.bmm(wm, mu).reshape(-1)
    if weight is None:
        return wm, -wmu
    gamma = weight.double().reshape(groups, g, 1)
    return gamma * wm, bias.double() - weight.double() * wmu
