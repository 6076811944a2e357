"""Synchronized CE, BD and IR: batch statistics over all processes of a process group.

In training, each layer sums its sufficient statistics (BD: count, Σx, Σxxᵀ per group,
Eqn 5; IR: count and Σσ̃², Eqn 8) over the processes with **one** all-reduce, then computes
the whitening matrix and the IR scale from the global sums on every rank. Sums are weighted
by the true number of positions on each rank, so unequal batches and ranks with an empty
batch give the statistics of the concatenated batch. The all-reduce is the autograd-aware
functional collective (``torch.distributed._functional_collectives.all_reduce``, whose
backward all-reduces the gradient), so outputs, input gradients, summed parameter gradients
and running buffers equal single-process training on the concatenated batch; it also traces
under ``torch.compile``. Eval uses the running buffers and does not communicate.

Without an initialized process group of more than one process the layers behave exactly as
their unsynchronized bases (and use the native CPU operator where the base would).
Build them with :func:`cenet.convert.convert_sync_ce`, which keeps parameter and buffer names.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from cenet.layers import functional as CF
from cenet.layers.batch_decorrelation import BatchDecorrelation
from cenet.layers.channel_equilibrium import ChannelEquilibrium
from cenet.layers.instance_reweighting import InstanceReweighting

__all__ = [
    "SyncBatchDecorrelation",
    "SyncChannelEquilibrium",
    "SyncInstanceReweighting",
    "all_reduce_sum",
    "is_synchronized",
]


def is_synchronized(process_group: dist.ProcessGroup | None) -> bool:
    """True if ``process_group`` (``None``: the default group) spans more than one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(process_group) > 1


def all_reduce_sum(
    tensors: list[Tensor], process_group: dist.ProcessGroup | None
) -> list[Tensor]:
    """Sum ``tensors`` over the processes with a single all-reduce of their concatenation.

    Differentiable: the backward all-reduces (sums) the gradients, as the sum's Jacobian
    requires. The tensors must share a dtype and device.

    Args:
        tensors: tensors of any shapes, one dtype.
        process_group: the group; ``None`` = the default (world) group.

    Returns:
        The summed tensors, in the input shapes.
    """
    from torch.distributed import _functional_collectives as funcol

    group = dist.group.WORLD if process_group is None else process_group
    flat = torch.cat([t.reshape(-1) for t in tensors])
    flat = funcol.wait_tensor(funcol.all_reduce(flat, "sum", group))
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].view(t.shape))
        start += t.numel()
    return out


class _Synchronized:
    """Mixin: the process group and whether this forward communicates."""

    process_group: dist.ProcessGroup | None = None
    training: bool

    def _synchronizes(self) -> bool:
        return self.training and is_synchronized(self.process_group)


class SyncChannelEquilibrium(_Synchronized, ChannelEquilibrium):
    """:class:`~cenet.layers.ChannelEquilibrium` whose training statistics (BD's and IR's
    together, in one all-reduce) are summed over ``process_group``.

    Same parameters, buffers and state-dict keys as the base class; build it with
    :func:`cenet.convert.convert_sync_ce`. In a synchronized forward the native CPU
    operator is not used (it computes per-process statistics), and the check for at least
    2 positions per group applies to the global batch only, so a rank may hold an empty batch.

    Shape:
        input (N, C, H, W), N may differ between ranks (and be 0); output like input.
    """

    def uses_native(self, x: Tensor) -> bool:
        if self._synchronizes():
            return False
        return super().uses_native(x)

    def forward(self, x: Tensor) -> Tensor:
        if not self._synchronizes():
            return super().forward(x)
        self._check_input(x)
        return self._reference(x)

    def _reduce_statistics(
        self, bd_stats: CF.GroupStatistics | None, ir_stats: CF.VarianceStatistics | None
    ) -> tuple[CF.GroupStatistics | None, CF.VarianceStatistics | None]:
        if not self._synchronizes():
            return bd_stats, ir_stats
        parts = [*(bd_stats or ()), *(ir_stats or ())]
        summed = all_reduce_sum(parts, self.process_group)  # one statistics dtype
        if bd_stats is not None:
            bd_stats, summed = CF.GroupStatistics(*summed[:3]), summed[3:]
        if ir_stats is not None:
            ir_stats = CF.VarianceStatistics(*summed)
        return bd_stats, ir_stats


class SyncBatchDecorrelation(_Synchronized, BatchDecorrelation):
    """:class:`~cenet.layers.BatchDecorrelation` with its training statistics (count, Σx,
    Σxxᵀ) summed over ``process_group`` in one all-reduce; see :class:`SyncChannelEquilibrium`.
    """

    def check_positions(self, x: Tensor) -> None:
        if not self._synchronizes():
            super().check_positions(x)

    def statistics(self, x: Tensor) -> CF.GroupStatistics:
        stats = super().statistics(x)
        if not self._synchronizes():
            return stats
        return CF.GroupStatistics(*all_reduce_sum(list(stats), self.process_group))


class SyncInstanceReweighting(_Synchronized, InstanceReweighting):
    """:class:`~cenet.layers.InstanceReweighting` with its batch scale's statistics (count,
    Σσ̃²) summed over ``process_group``; the gate stays per instance (Eqn 8)."""

    def statistics(self, inst_var: Tensor) -> CF.VarianceStatistics:
        stats = super().statistics(inst_var)
        if not self._synchronizes():
            return stats
        return CF.VarianceStatistics(*all_reduce_sum(list(stats), self.process_group))


SYNC_CLASSES: dict[type, type] = {
    ChannelEquilibrium: SyncChannelEquilibrium,
    BatchDecorrelation: SyncBatchDecorrelation,
    InstanceReweighting: SyncInstanceReweighting,
}
"""Each CE layer class and its synchronized version."""
