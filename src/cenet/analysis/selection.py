"""Select the modules of a network to measure: by name glob, by type or by predicate."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

from torch import nn

LayerSpec = (
    str | type[nn.Module] | Callable[[str, nn.Module], bool] | Sequence[str | type[nn.Module]]
)
"""A selection: a name glob (``"features.*"``), a module type, a sequence mixing globs and
types (a module matching any of them is selected), or a predicate ``(name, module) -> bool``."""

RECTIFIERS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.ELU, nn.LeakyReLU)
"""The rectifier types the activation measurements (inhibited channels, ablation, correlation)
select by default."""


def _gate_types() -> tuple[type[nn.Module], ...]:
    # Imported here: the analysis package must not import the layers at module load.
    from torchvision.ops import SqueezeExcitation as TorchvisionSE

    from cenet.layers import (
        ChannelEquilibrium,
        GatedChannelTransformation,
        InstanceReweighting,
        SqueezeExcitation,
    )

    return (
        ChannelEquilibrium, InstanceReweighting, SqueezeExcitation, GatedChannelTransformation,
        TorchvisionSE,
    )


def feature_rectifiers(model: nn.Module) -> Callable[[str, nn.Module], bool]:
    """The default activation selection for ``model``: every :data:`RECTIFIERS` module except
    those inside a channel gate (SE, IR, CE, GCT, torchvision's SE), whose hidden units
    act on a pooled C/r vector and are not feature-map channels (counting them would make
    SE look like it has inhibited channels)."""
    gates = _gate_types()
    inside = {
        f"{name}.{sub}"
        for name, m in model.named_modules()
        if isinstance(m, gates)
        for sub, _ in m.named_modules()
        if sub
    }
    return lambda name, module: isinstance(module, RECTIFIERS) and name not in inside


def _matcher(spec: LayerSpec) -> Callable[[str, nn.Module], bool]:
    if isinstance(spec, str):
        return lambda name, _m: fnmatch.fnmatchcase(name, spec)
    if isinstance(spec, type):
        if not issubclass(spec, nn.Module):
            raise ValueError(f"a layer type must be an nn.Module subclass, got {spec!r}")
        return lambda _n, module: isinstance(module, spec)
    if isinstance(spec, Sequence):
        if not spec:
            raise ValueError("an empty sequence selects no layer; give globs or types")
        parts = [_matcher(s) for s in spec]
        for s in spec:
            if not isinstance(s, str | type):
                raise ValueError(f"a sequence of layers may hold globs and types only, got {s!r}")
        return lambda name, module: any(p(name, module) for p in parts)
    if callable(spec):
        return spec
    raise ValueError(
        f"cannot select layers with {spec!r}; give a name glob, a module type, a sequence of "
        "them, or a predicate (name, module) -> bool"
    )


def select_modules(
    model: nn.Module, layers: LayerSpec | None = None, *, default: LayerSpec | None = None
) -> dict[str, nn.Module]:
    """The modules of ``model`` matched by ``layers`` (``default`` when ``None``; when both are
    ``None``, the rectifiers outside channel gates, :func:`feature_rectifiers`).

    Names are those of ``model.named_modules()`` (the root is ``""``), in that order; a module
    registered under several names appears once, under its first name.

    Raises:
        ValueError: for a malformed selection, or one that matches nothing (the message
            repeats the selection and lists some of the available module names).
    """
    spec = default if layers is None else layers
    shown_spec = repr(spec)
    if spec is None:
        spec = feature_rectifiers(model)
        shown_spec = "the default (rectifiers outside channel gates)"
    match = _matcher(spec)
    selected = {name: m for name, m in model.named_modules() if match(name, m)}
    if not selected:
        names = [n for n, _ in model.named_modules() if n]
        shown = ", ".join(repr(n) for n in names[:12]) + (", ..." if len(names) > 12 else "")
        raise ValueError(
            f"layer selection {shown_spec} matches no module of {type(model).__name__}; "
            f"available modules include {shown or 'none'}"
        )
    return selected
