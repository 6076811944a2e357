"""The one rule by which the CE layers update their running estimates (CE paper, Eqn 32)."""

from __future__ import annotations

import torch
from torch import Tensor


def check_finite(finite: Tensor, layer: str) -> None:
    """Raise ``FloatingPointError`` if ``finite`` (a bool tensor) is False.

    Checked in eager mode on the CPU only: on an accelerator it would synchronize every layer
    of every step, and inside ``torch.compile``/``torch.export`` it would be a branch on data.
    There :func:`update_running_` still leaves the buffers untouched for a non-finite batch.
    """
    if torch.compiler.is_compiling() or finite.device.type != "cpu":
        return
    if not bool(finite):
        raise FloatingPointError(
            f"{layer}: the batch statistics are not finite (NaN/Inf in the input); the "
            "running estimates were not updated"
        )


def update_running_(buffer: Tensor, value: Tensor, momentum: float, finite: Tensor) -> None:
    """buffer ← (1 − m)·buffer + m·value where ``finite``, else unchanged (Eqn 32).

    ``value`` is cast to the buffer's dtype explicitly (a float16 module keeps float16
    buffers while its statistics are float32); no gradient flows.
    """
    with torch.no_grad():
        new = torch.lerp(buffer, value.detach().to(buffer.dtype), momentum)
        buffer.copy_(torch.where(finite, new, buffer))


def all_finite(*tensors: Tensor) -> Tensor:
    """A 0-d bool tensor: every element of every tensor is finite."""
    flags = [torch.isfinite(t).all() for t in tensors]
    out = flags[0]
    for flag in flags[1:]:
        out = out & flag
    return out
