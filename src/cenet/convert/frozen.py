"""Freeze the norms of a network for fine-tuning with tiny batches (detection, CE paper Table 5):
BN → ``torchvision.ops.FrozenBatchNorm2d``, CE → :class:`~cenet.layers.FrozenChannelEquilibrium`."""

from __future__ import annotations

from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from cenet.layers.channel_equilibrium import ChannelEquilibrium
from cenet.layers.frozen_ce import FrozenChannelEquilibrium

__all__ = ["freeze_norms"]


def _frozen_bn(bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    frozen.to(device=bn.running_mean.device, dtype=bn.running_mean.dtype)
    for name in ("running_mean", "running_var"):
        getattr(frozen, name).copy_(getattr(bn, name))
    if bn.affine:
        frozen.weight.copy_(bn.weight.detach())
        frozen.bias.copy_(bn.bias.detach())
    return frozen


def freeze_norms(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` (``nn.SyncBatchNorm`` included) by a
    ``torchvision.ops.FrozenBatchNorm2d`` and every CE block (synchronized or not) by a
    :class:`~cenet.layers.FrozenChannelEquilibrium`, each holding a copy of the layer's
    running statistics and affine parameters (as buffers; the same state-dict keys except BN's
    ``num_batches_tracked``). Like timm's ``freeze_batch_norm_2d``, containers are changed in
    place and the (possibly new) root module is returned.

    A BN must track running statistics (``track_running_stats=True``); a CE block must be of
    ``"ce"``, ``"bd"`` or ``"ir"`` mode (all are).

    Args:
        module: any network, or a single BN/CE layer.

    Returns:
        ``module`` with its norms frozen (a new object if ``module`` itself is one).

    Raises:
        TypeError: if ``module`` is not an ``nn.Module``.
        ValueError: for a BatchNorm2d without running statistics (it has nothing to freeze).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"freeze_norms expects an nn.Module, got {type(module).__name__}")
    if isinstance(module, ChannelEquilibrium) and not isinstance(module, FrozenChannelEquilibrium):
        return FrozenChannelEquilibrium.from_module(module)
    if isinstance(module, nn.BatchNorm2d | nn.SyncBatchNorm):
        if module.running_mean is None:
            raise ValueError(
                f"cannot freeze {module!r}: it keeps no running statistics "
                f"(track_running_stats=False); train it with running statistics first"
            )
        return _frozen_bn(module)
    for name, child in module.named_children():
        module.add_module(name, freeze_norms(child))
    return module
