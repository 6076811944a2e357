"""timm integration (optional: ``pip install cenet[timm]``): cenet's networks in timm's registry.

After ``import cenet.timm``, ``timm.create_model`` builds the networks of
:func:`cenet.list_models` whose names timm does not already have::

    import timm
    import cenet.timm  # noqa: F401

    model = timm.create_model("resnet50_ce")
    model = timm.create_model("cifar_resnet20_ce", num_classes=10)

Names timm already uses (``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``) are left to
timm (listed in :data:`SKIPPED`): registering ours would silently replace timm's own model
(and its pretrained weights) for every user of the process. Our plain twins stay available as
``cenet.create_model("resnet50")``. The registered entry points live in this module (timm lists
them under the module name ``"timm"``: ``timm.list_models(module="timm")``).

Keyword arguments are those of the cenet builder (``width``, ``attn_kwargs``, ...; an unknown
one raises ``TypeError``), plus what timm's ``create_model`` and training script always pass:
``pretrained`` (must be False: cenet has no pretrained weights; load a checkpoint with
``checkpoint_path=``), ``pretrained_cfg``/``pretrained_cfg_overlay`` (set the model's
``pretrained_cfg``, which ``timm.data.resolve_data_config`` reads), ``cache_dir`` (unused),
``in_chans=3`` (every network's default; other values go to the builder), and
``drop_rate``/``drop_path_rate``/``drop_block_rate`` when 0 (none of our networks has
stochastic depth or DropBlock; other values raise ``ValueError``). timm's classifier helpers
(``get_classifier``, ``reset_classifier``, ``forward_head``) are not provided.

timm networks convert with :func:`cenet.convert_ce` like any other; their norm-act layers
(``BatchNormAct2d``, ...) get the CE between the normalization and their activation.
"""

from __future__ import annotations

from collections.abc import Callable

try:
    import timm.models as _timm_models
except ImportError as err:  # pragma: no cover - exercised only without timm
    raise ImportError(
        "cenet.timm needs timm: pip install 'cenet[timm]' (or pip install timm)"
    ) from err
from torch import nn

from cenet.data.augment import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
from cenet.models.registry import get_model_builder, list_models

__all__ = ["REGISTERED", "SKIPPED", "register_cenet_models"]

#: names registered with timm by this module
REGISTERED: list[str] = []
#: cenet names left to timm because timm already has a model of that name
SKIPPED: list[str] = []

#: timm's per-architecture configs for our networks (read by ``timm.models.register_model``)
default_cfgs: dict[str, dict] = {}

_NOOP_RATES = ("drop_rate", "drop_path_rate", "drop_block_rate")


def _default_cfg(name: str) -> dict:
    """timm's data config for network ``name``: 32×32 CIFAR-10 or 224×224 ImageNet."""
    if name.startswith("cifar_"):
        return {"input_size": (3, 32, 32), "mean": CIFAR10_MEAN, "std": CIFAR10_STD,
                "crop_pct": 1.0, "interpolation": "bilinear", "num_classes": 10}
    cfg = {"input_size": (3, 224, 224), "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
           "crop_pct": 0.875, "interpolation": "bilinear", "num_classes": 1000}
    if name.startswith("resnet"):
        cfg.update(first_conv="conv1", classifier="fc")
    return cfg


def _entrypoint(name: str) -> Callable[..., nn.Module]:
    """A timm entry point (``fn(pretrained=False, **kwargs)``) for cenet network ``name``."""
    builder = get_model_builder(name)

    def entry(pretrained: bool = False, *, pretrained_cfg=None, pretrained_cfg_overlay=None,
              cache_dir=None, **kwargs) -> nn.Module:
        if pretrained:
            raise ValueError(
                f"cenet has no pretrained weights for {name!r}; build it with "
                f"pretrained=False and load a checkpoint (checkpoint_path=...)"
            )
        for rate in _NOOP_RATES:
            value = kwargs.pop(rate, None)
            if value:
                raise ValueError(f"{name} has no {rate.removesuffix('_rate')} layers: "
                                 f"{rate} must be 0, got {value!r}")
        if kwargs.get("in_chans") == 3:
            del kwargs["in_chans"]
        model = builder(**kwargs)
        cfg = _timm_models.resolve_pretrained_cfg(name, pretrained_cfg, pretrained_cfg_overlay)
        model.pretrained_cfg = model.default_cfg = cfg.to_dict()
        return model

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"timm entry point of :func:`cenet.create_model` ``({name!r})``. " + (
        builder.__doc__ or ""
    )
    return entry


def register_cenet_models(pattern: str | None = None) -> list[str]:
    """Register cenet's networks (matching the glob ``pattern``, all by default) with timm.

    Idempotent: names registered before are skipped, and so are names timm already has
    (collected in :data:`SKIPPED`). Called on import for every network; call it again for
    networks registered with cenet afterwards.

    Returns:
        the names registered by this call.
    """
    new = []
    for name in list_models(pattern):
        if name in REGISTERED or name in SKIPPED:
            continue
        if _timm_models.is_model(name):
            SKIPPED.append(name)
            continue
        default_cfgs[name] = _default_cfg(name)
        entry = _entrypoint(name)
        globals()[name] = entry  # a module attribute, like timm's own entry points
        _timm_models.register_model(entry)
        REGISTERED.append(name)
        new.append(name)
    return new


register_cenet_models()
