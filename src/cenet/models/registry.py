"""Model registry: ``register_model``, ``create_model`` and ``list_models``.

Names are the base network followed by the block as a suffix (``cifar_vgg16``,
``cifar_vgg16_ce``, ``resnet50_se`` ...), in the manner of timm's registry.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model builder under its function name; returns ``fn`` unchanged.

    Raises:
        ValueError: if a builder with the same name is already registered.
    """
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered models, optionally filtered by a glob ``pattern``."""
    names = sorted(_MODELS)
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


def get_model_builder(name: str) -> Callable[..., nn.Module]:
    """The builder registered as ``name``.

    Raises:
        ValueError: for an unknown name; the message lists the closest registered names.
    """
    try:
        return _MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_MODELS), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}{hint} (cenet.list_models() lists all {len(_MODELS)})"
        ) from None


def create_model(name: str, *, num_classes: int | None = None, **kwargs) -> nn.Module:
    """Build the registered network ``name``.

    Args:
        name: a name from :func:`list_models`, e.g. ``"cifar_resnet20_ce"``.
        num_classes: size of the classifier output (``None``: the builder's default, 10 for
            the CIFAR networks, 1000 for the ImageNet ones).
        **kwargs: keyword arguments of that builder (``width``, ``norm_layer``, ...); the
            builder's own signature rejects any it does not take (``TypeError``).

    Raises:
        ValueError: for an unknown name (with close matches).
    """
    builder = get_model_builder(name)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return builder(**kwargs)
