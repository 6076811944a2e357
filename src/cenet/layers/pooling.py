"""2×2 max pooling for the BD statistics (CE paper, appendix G), fast on CPU.

``F.max_pool2d(x, 2, 2)`` on an NCHW CPU tensor also builds an int64 index map and takes about
13 ms for the (8, 64, 112, 112) map after the ResNet stem on this 2-core machine; the compiled
kernel (:mod:`cenet.kernels`) reads the map once and keeps no index map: the backward finds
each window's maximum again, as ``F.max_pool2d`` chose it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cenet import kernels


class _MaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        ctx.save_for_backward(x)
        return torch.ops.cenet_kernels.max_pool_2x2(x.view(n * c, h, w)).view(
            n, c, h // 2, w // 2
        )

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        n, c, h, w = x.shape
        grad_x = torch.empty_like(x)
        torch.ops.cenet_kernels.max_pool_2x2_backward(
            x.view(n * c, h, w), grad.reshape(n * c, h // 2, w // 2).to(x.dtype), False,
            grad_x.view(n * c, h, w),
        )
        return grad_x


def max_pool_2x2(x: Tensor) -> Tensor:
    """``F.max_pool2d(x, 2, 2)``: (N, C, H, W) → (N, C, H // 2, W // 2), the same values and
    gradients (the first maximum of each window in row-major order gets the gradient).

    NCHW-contiguous float32/float64 CPU input goes through the compiled kernels, anything else
    (channels-last, other devices and dtypes, ``torch.compile``) through ``F.max_pool2d``.
    """
    if x.dim() == 4 and x.is_contiguous() and kernels.kernels_usable(0, x):
        return _MaxPool2x2.apply(x)
    return F.max_pool2d(x, 2, 2)
