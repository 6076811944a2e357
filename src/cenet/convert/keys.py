"""Rename ``state_dict`` keys between a ResNet converted with :func:`~cenet.convert.convert_ce`
and the same network built by ``cenet.create_model("resnet{18,34,50,101}_ce")``.

The two hold the same tensors under different names (the CE blocks only; every other key is
torchvision's in both):

=============================  ===============================
converted torchvision ResNet   ``create_model`` layout
=============================  ===============================
``bn1.ce.*`` (the stem CE)      ``stem_attn.*``
``layerI.J.bn3.ce.*``           ``layerI.J.attn.*`` (Bottleneck: ResNet-50/101)
``layerI.J.bn2.ce.*``           ``layerI.J.attn.*`` (BasicBlock: ResNet-18/34)
=============================  ===============================

A block is a Bottleneck when the state dict has keys under ``layerI.J.bn3.``, else a
BasicBlock. This module only renames strings; it imports neither ``models`` nor ``layers``.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["ce_keys_from_model", "ce_keys_to_model"]

_STEM_CONVERTED = re.compile(r"bn1\.ce(?P<rest>\..*)?")
_BLOCK_CONVERTED = re.compile(r"(?P<block>layer\d+\.\d+)\.(?P<norm>bn\d+)\.ce(?P<rest>\..*)?")
_STEM_MODEL = re.compile(r"stem_attn(?P<rest>\..*)?")
_BLOCK_MODEL = re.compile(r"(?P<block>layer\d+\.\d+)\.attn(?P<rest>\..*)?")
_ANY_CE = re.compile(r"(^|.*\.)ce(\..*)?")


def _last_norm(keys: set[str], block: str) -> str:
    """``bn3`` if the state dict has a Bottleneck's third norm at ``block``, else ``bn2``."""
    prefix = f"{block}.bn3."
    return "bn3" if any(k.startswith(prefix) for k in keys) else "bn2"


def _renamed(state_dict: Mapping[str, Any], rename: Callable[[str], str]) -> OrderedDict:
    """A new ordered dict: same values (the same tensor objects), keys and the ``_metadata``
    module paths passed through ``rename``."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"expected a state dict (a mapping of key to tensor), got {type(state_dict).__name__}"
        )
    out = OrderedDict((rename(k), v) for k, v in state_dict.items())
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = OrderedDict(  # type: ignore[attr-defined]
            (rename(k) if k else k, v) for k, v in metadata.items()
        )
    return out


def ce_keys_to_model(state_dict: Mapping[str, Any]) -> OrderedDict:
    """Keys of a converted torchvision ResNet → the ``create_model("resnet*_ce")`` layout.

    Example (the paper's ResNet-50: Sec. 5.1 and appendix G)::

        tv = torchvision.models.resnet50()
        cenet.convert_ce(tv, after=["layer1.*.bn3", "layer2.*.bn3", "layer3.*.bn3"])
        cenet.convert_ce(tv, after="bn1", group_size=64, pool=True)
        ours = cenet.create_model("resnet50_ce")
        ours.load_state_dict(cenet.convert.ce_keys_to_model(tv.state_dict()), strict=True)

    Args:
        state_dict: ``model.state_dict()`` of a converted torchvision (or torchvision-named)
            ResNet: ``bn1.ce.*`` and ``layerI.J.<last norm>.ce.*`` for the CE blocks.

    Returns:
        A new ``OrderedDict`` in the same order holding the same tensors, with
        ``bn1.ce.*`` → ``stem_attn.*`` and ``layerI.J.bn3.ce.*`` (Bottleneck) or
        ``layerI.J.bn2.ce.*`` (BasicBlock) → ``layerI.J.attn.*``; every other key unchanged
        (so keys already in the model layout pass through). ``_metadata`` (module versions)
        is renamed alike. The input is not modified.

    Raises:
        ValueError: for a CE key the ``create_model`` ResNets have no place for (a CE after a
            norm other than the stem's ``bn1`` or a residual branch's last norm, e.g.
            ``layer1.0.bn1.ce.*`` or ``layer2.0.downsample.1.ce.*``); the message names it.
        TypeError: if ``state_dict`` is not a mapping.
    """
    keys = set(state_dict) if isinstance(state_dict, Mapping) else set()

    def rename(key: str) -> str:
        if m := _STEM_CONVERTED.fullmatch(key):
            return f"stem_attn{m['rest'] or ''}"
        if m := _BLOCK_CONVERTED.fullmatch(key):
            last = _last_norm(keys, m["block"])
            if m["norm"] == last:
                return f"{m['block']}.attn{m['rest'] or ''}"
        if _ANY_CE.fullmatch(key):
            raise ValueError(
                f"state dict key {key!r} is a CE block that create_model's ResNets do not "
                f"have: they put CE only after the stem's bn1 (stem_attn) and after the last "
                f"norm of a residual branch (layerI.J.bn3 in a Bottleneck, layerI.J.bn2 in a "
                f"BasicBlock; create_model's attn)"
            )
        return key

    return _renamed(state_dict, rename)


def ce_keys_from_model(state_dict: Mapping[str, Any]) -> OrderedDict:
    """Keys of ``create_model("resnet*_ce")`` (or ``_bd``, ``_ir``) → the layout of a
    torchvision ResNet converted with :func:`~cenet.convert.convert_ce`; the inverse of
    :func:`ce_keys_to_model`.

    Example::

        ours = cenet.create_model("resnet50_ce")
        tv = torchvision.models.resnet50()
        cenet.convert_ce(tv, after=["layer1.*.bn3", "layer2.*.bn3", "layer3.*.bn3"])
        cenet.convert_ce(tv, after="bn1", group_size=64, pool=True)
        tv.load_state_dict(cenet.convert.ce_keys_from_model(ours.state_dict()), strict=True)

    Args:
        state_dict: ``model.state_dict()`` of an ImageNet ResNet from ``create_model`` with
            CE blocks at ``stem_attn`` and ``layerI.J.attn``.

    Returns:
        A new ``OrderedDict`` in the same order holding the same tensors, with
        ``stem_attn.*`` → ``bn1.ce.*`` and ``layerI.J.attn.*`` → ``layerI.J.bn3.ce.*`` when
        the block has a ``bn3`` (Bottleneck), else ``layerI.J.bn2.ce.*``; every other key
        unchanged. ``_metadata`` is renamed alike. The input is not modified.

    Raises:
        TypeError: if ``state_dict`` is not a mapping.
    """
    keys = set(state_dict) if isinstance(state_dict, Mapping) else set()

    def rename(key: str) -> str:
        if m := _STEM_MODEL.fullmatch(key):
            return f"bn1.ce{m['rest'] or ''}"
        if m := _BLOCK_MODEL.fullmatch(key):
            return f"{m['block']}.{_last_norm(keys, m['block'])}.ce{m['rest'] or ''}"
        return key

    return _renamed(state_dict, rename)
