"""Turn the CE layers of a network into their synchronized versions and back, in the manner of
``torch.nn.SyncBatchNorm.convert_sync_batchnorm``."""

from __future__ import annotations

import copy

import torch.distributed as dist
from torch import nn

from cenet.layers.sync_ce import SYNC_CLASSES

_UNSYNC_CLASSES = {sync: base for base, sync in SYNC_CLASSES.items()}


def _retype(module: nn.Module, cls: type) -> nn.Module:
    """A new module of class ``cls`` (a subclass or base of ``type(module)`` adding no state)
    that shares ``module``'s parameters, buffers and submodules, with its own containers."""
    new = cls.__new__(cls)
    for key, value in vars(module).items():
        new.__dict__[key] = copy.copy(value) if isinstance(value, dict | set) else value
    return new


def convert_sync_ce(
    module: nn.Module, process_group: dist.ProcessGroup | None = None
) -> nn.Module:
    """Replace every :class:`~cenet.layers.ChannelEquilibrium`, and every
    :class:`~cenet.layers.BatchDecorrelation` / :class:`~cenet.layers.InstanceReweighting`
    outside a CE block, by its synchronized version (:mod:`cenet.layers.sync_ce`).

    The new layers share the old ones' parameters and buffers (the same tensors, so an
    optimizer built before still updates them) and keep every state-dict key: a state dict
    loads into the converted and into the reverted network alike. A CE block's own BD and
    IR parts stay as they are: the block all-reduces their statistics together, once. Like
    ``SyncBatchNorm.convert_sync_batchnorm``, containers are changed in place and the
    (possibly new) root module is returned.

    Args:
        module: any network (or a single CE layer).
        process_group: the group to synchronize over; ``None`` = the default (world) group,
            looked up at each forward (so conversion may precede ``init_process_group``).

    Returns:
        ``module`` with its CE layers converted (a new object if ``module`` itself is one).

    Raises:
        TypeError: if ``module`` is not an ``nn.Module``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert_sync_ce expects an nn.Module, got {type(module).__name__}")
    cls = type(module)
    if cls in SYNC_CLASSES:
        new = _retype(module, SYNC_CLASSES[cls])
        new.process_group = process_group
        return new
    if cls in _UNSYNC_CLASSES:  # already synchronized: only the group may change
        module.process_group = process_group
        return module
    for name, child in module.named_children():
        module.add_module(name, convert_sync_ce(child, process_group))
    return module


def revert_sync_ce(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync_ce`: synchronized CE/BD/IR layers become their base classes,
    sharing parameters and buffers and keeping every state-dict key.

    Args:
        module: any network.

    Returns:
        ``module`` with its synchronized layers reverted (a new object if ``module`` itself
        is one).

    Raises:
        TypeError: if ``module`` is not an ``nn.Module``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"revert_sync_ce expects an nn.Module, got {type(module).__name__}")
    cls = type(module)
    if cls in _UNSYNC_CLASSES:
        new = _retype(module, _UNSYNC_CLASSES[cls])
        new.__dict__.pop("process_group", None)
        return new
    for name, child in module.named_children():
        module.add_module(name, revert_sync_ce(child))
    return module
