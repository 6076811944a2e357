"""Insert CE blocks into an existing network after chosen normalization layers.

Modeled on :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`: a recursive in-place
conversion that returns the root. CE goes between the normalization layer and the rectifier
(CE paper, Sec. 3.3 and Fig. 2c: ``Norm → CE → g``).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from cenet.layers import ChannelEquilibrium

#: the norm types ``after="all"`` selects (subclasses included, e.g. timm's BatchNormAct2d,
#: GroupNormAct); besides these, ``nn.LayerNorm`` subclasses named ``LayerNorm2d`` or
#: ``LayerNormAct2d`` (timm's and torchvision's channel LayerNorm of NCHW maps)
ALL_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm2d,
)
_LAYERNORM_2D_NAMES = ("LayerNorm2d", "LayerNormAct2d")

Selection = (
    str | Sequence[str] | type[nn.Module] | tuple[type[nn.Module], ...]
    | Callable[[str, nn.Module], bool]
)


class _KeepKeys(nn.Module):
    """Base of the wrappers: ``state_dict`` keys of the wrapped module stay where they were.

    The wrapped module lives at the attribute named by ``_inner``; in ``state_dict`` its keys
    are saved (and loaded) without that attribute (``bn3.weight``, not ``bn3.norm.weight``),
    next to the new block's keys ``<name>.ce.*``. Loading also accepts the structural keys
    (``bn3.norm.weight``). ``named_parameters()`` and ``named_modules()`` show the structure
    (``bn3.norm.weight``). Reading the wrapped module's parameters and buffers through the
    wrapper works (``model.layer1[0].bn3.weight``, ``model.get_parameter("...bn3.weight")``);
    ``get_buffer`` needs the structural name (``...bn3.norm.running_mean``).
    """

    _inner = ""

    def __init__(self) -> None:
        super().__init__()
        self.register_state_dict_post_hook(_save_without_inner)
        self.register_load_state_dict_post_hook(_report_saved_names)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get(self._inner)
            if inner is not None and (name in inner._parameters or name in inner._buffers):
                return getattr(inner, name)
            raise

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # move the wrapped module's keys below its attribute before the children load them
        # (``state_dict`` here is load_state_dict's own copy, from which children are served)
        own = tuple(f"{prefix}{child}." for child in self._modules)
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(own)]:
            state_dict[f"{prefix}{self._inner}.{key[len(prefix):]}"] = state_dict.pop(key)
        self.__dict__["_loading_prefix"] = prefix
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def _save_without_inner(module: _KeepKeys, state_dict, prefix: str, local_metadata) -> None:
    """State-dict post-hook: ``<prefix><inner>.k`` → ``<prefix>k``, keeping the key order."""
    inner = f"{prefix}{module._inner}."
    keys = [k for k in state_dict if k.startswith(prefix)]  # the wrapper's subtree, last
    items = [(k, state_dict.pop(k)) for k in keys]
    for key, value in items:
        state_dict[prefix + key[len(inner):] if key.startswith(inner) else key] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None and inner[:-1] in metadata:
        # the saved file carries the wrapped module's version (e.g. BatchNorm's) at its name
        metadata[prefix[:-1]] = metadata.pop(inner[:-1])


def _report_saved_names(module: _KeepKeys, incompatible_keys) -> None:
    """Load-state-dict post-hook: report missing keys of the wrapped module by their saved
    names (``bn3.weight``, as in the file), not the structural ones."""
    prefix = module.__dict__.pop("_loading_prefix", None)
    if prefix is None:
        return
    inner = f"{prefix}{module._inner}."
    missing = incompatible_keys.missing_keys
    missing[:] = [prefix + k[len(inner):] if k.startswith(inner) else k for k in missing]


class NormCE(_KeepKeys):
    """``norm → ce``: a normalization layer followed by the CE block inserted after it.

    Replaces the norm at its attribute; the norm object itself is kept as ``self.norm``.
    ``state_dict`` keys: the norm's unchanged (``bn3.weight``, ``bn3.running_mean``, ...)
    plus ``bn3.ce.*`` (see :class:`_KeepKeys`).

    Shape:
        input (N, C, H, W), output (N, C, H, W).
    """

    _inner = "norm"

    def __init__(self, norm: nn.Module, ce: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.ce = ce
        self.training = norm.training

    def forward(self, x: Tensor) -> Tensor:
        return self.ce(self.norm(x))


class CEAct(_KeepKeys):
    """``ce → act``: the CE block put in front of the activation of a norm-act layer (timm's
    ``BatchNormAct2d``, ``GroupNormAct``, ...), which applies ``drop`` and ``act`` inside its
    own forward; replaces ``act`` there, so CE sits between the normalization and the
    rectifier. ``state_dict`` keys: ``<norm>.act.*`` unchanged plus ``<norm>.act.ce.*``.

    Shape:
        input (N, C, H, W), output (N, C, H, W).
    """

    _inner = "act"

    def __init__(self, ce: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.ce = ce
        self.act = act
        self.training = act.training

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.ce(x))


def norm_channels(norm: nn.Module) -> int | None:
    """C of a normalization layer: ``num_features`` (BatchNorm, InstanceNorm),
    ``num_channels`` (GroupNorm), ``normalized_shape[0]`` (LayerNorm2d), or the length of a
    1-D ``weight`` (e.g. torchvision's FrozenBatchNorm2d); ``None`` if none of these."""
    for attr in ("num_features", "num_channels"):
        value = getattr(norm, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    shape = getattr(norm, "normalized_shape", None)
    if isinstance(shape, Sequence) and len(shape) >= 1:
        return int(shape[0])
    weight = getattr(norm, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 1:
        return weight.shape[0]
    return None


def _is_norm_act(norm: nn.Module) -> bool:
    """A norm layer that applies its own activation (timm's norm-act layers): CE goes in front
    of that activation, not after the layer."""
    return isinstance(norm._modules.get("act"), nn.Module)


def _in_ce_block(name: str, ce_names: list[str]) -> bool:
    return any(name.startswith(p + ".") for p in ce_names)


def select_norms(model: nn.Module, after: Selection | None) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs of ``model`` that ``after`` selects, in module order.

    See :func:`convert_ce` for the forms of ``after``.

    Raises:
        ValueError: if ``after`` is ``None``, of an unknown form, a glob pattern that matches
            no module (named in the message, with close module names), or a type or
            predicate that selects nothing.
    """
    if after is None:
        raise ValueError(
            "convert_ce needs a selection of norm layers: after='layer*.*.bn3' (glob "
            "pattern(s) on module names), after=nn.BatchNorm2d (type(s)), a predicate "
            "(name, module) -> bool, or after='all' (every BatchNorm2d, SyncBatchNorm, "
            "GroupNorm, InstanceNorm2d, LayerNorm2d)"
        )
    named = list(model.named_modules())
    ce_names = [n for n, m in named if isinstance(m, ChannelEquilibrium)]
    if isinstance(after, str) and after == "all":
        def is_all(_name: str, m: nn.Module) -> bool:
            return isinstance(m, ALL_NORM_TYPES) or (
                isinstance(m, nn.LayerNorm) and type(m).__name__ in _LAYERNORM_2D_NAMES
            )
        return [(n, m) for n, m in named if is_all(n, m) and not _in_ce_block(n, ce_names)]
    if isinstance(after, str) or (
        isinstance(after, Sequence) and after and all(isinstance(p, str) for p in after)
    ):
        patterns = [after] if isinstance(after, str) else list(after)
        picked: dict[str, nn.Module] = {}
        for pattern in patterns:
            hits = [(n, m) for n, m in named if n and fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                close = difflib.get_close_matches(pattern, [n for n, _ in named], n=3)
                hint = f" (close module names: {', '.join(map(repr, close))})" if close else ""
                raise ValueError(
                    f"after pattern {pattern!r} matches no module of the "
                    f"{type(model).__name__}{hint}"
                )
            picked.update(hits)
        return [(n, m) for n, m in named if n in picked]
    if isinstance(after, type) or (
        isinstance(after, tuple) and after and all(isinstance(t, type) for t in after)
    ):
        hits = [(n, m) for n, m in named
                if isinstance(m, after) and not _in_ce_block(n, ce_names)]
        if not hits:
            raise ValueError(f"after={after!r}: the {type(model).__name__} has no such module")
        return hits
    if callable(after):
        hits = [(n, m) for n, m in named if after(n, m)]
        if not hits:
            raise ValueError(f"the after predicate {after!r} selects no module")
        return hits
    raise ValueError(
        f"after must be a glob pattern, a sequence of patterns, a module type or a tuple of "
        f"types, a predicate (name, module) -> bool, or 'all'; got {after!r}"
    )


def _factory(module: nn.Module) -> dict:
    """device and dtype of the module's first floating parameter or buffer (else defaults)."""
    for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        if t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {}


def convert_ce(
    model: nn.Module,
    *,
    after: Selection | None = None,
    mode: str = "ce",
    **ce_kwargs,
) -> nn.Module:
    """Insert a :class:`~cenet.layers.ChannelEquilibrium` block right after selected norm layers.

    In the manner of :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`: converts
    ``model`` in place and returns its root (the root itself only changes when the root is a
    selected norm layer; then a :class:`NormCE` wrapping it is returned). Every existing module
    object, parameter and buffer (the same tensor objects), the ``training`` flags and
    everything that is not selected are kept; the new CE blocks are created on the device and
    dtype of the norm they follow and in its training mode. Either all selected norms are
    converted or, if building a block fails, nothing is changed.

    Placement (CE paper, Sec. 3.3, Fig. 2c): ``Norm → CE → g``. Each selected norm is
    replaced at its attribute by ``NormCE(norm, ce)`` (forward ``ce(norm(x))``). A norm-act
    layer (a norm with an ``act`` submodule, timm's ``BatchNormAct2d``/``GroupNormAct``...,
    whose forward is ``act(drop(norm(x)))``) stays in place and its ``act`` becomes
    ``CEAct(ce, act)``, so CE again comes before the rectifier. The paper's ResNet-50
    (CE after the last BN of each residual branch outside stage 4, and a CE with group 64 and
    2×2 pooled statistics after the stem BN; CE paper appendix G) from torchvision's::

        model = torchvision.models.resnet50()
        convert_ce(model, after=["layer1.*.bn3", "layer2.*.bn3", "layer3.*.bn3"])
        convert_ce(model, after="bn1", group_size=64, pool=True)

    That is ``cenet.create_model("resnet50_ce")`` with other ``state_dict`` names for the CE
    blocks (``bn1.ce.*``, ``layer1.0.bn3.ce.*`` here; ``stem_attn.*``, ``layer1.0.attn.*``
    there): :func:`~cenet.convert.ce_keys_to_model` and
    :func:`~cenet.convert.ce_keys_from_model` rename between the two.

    State-dict keys. Why a wrapper that keeps the keys, rather than ``nn.Sequential(norm, ce)``
    (keys ``bn3.0.weight``, so no checkpoint of the original network loads) or a forward hook
    on the norm (keys kept, but the CE is invisible to the module tree's forward: tools that
    rebuild norm layers, such as ``convert_sync_batchnorm``, timm's ``freeze_batch_norm_2d``
    or conv-BN fusion, would silently drop it): with :class:`NormCE` these tools recurse into
    the wrapper and convert the inner norm while the CE stays, and ``state_dict()`` keeps the
    original keys (``layer1.0.bn3.weight``) and adds ``layer1.0.bn3.ce.*``. So a checkpoint
    of the original network loads with ``load_state_dict(sd, strict=False)``, the missing
    keys being exactly the new CE's. ``named_parameters()`` shows the structure
    (``layer1.0.bn3.norm.weight``); attribute reads (``model.layer1[0].bn3.weight``) and
    ``get_parameter`` also accept the saved names.

    Args:
        model: any ``nn.Module`` (torchvision, timm or one's own) whose norm layers are called
            as submodules and produce (N, C, H, W) maps.
        after: which norm layers get a CE:

            - a glob pattern (``fnmatch``, case-sensitive, ``*`` also crosses dots) on
              ``named_modules()`` names, e.g. ``"layer*.*.bn3"``, or a sequence of patterns;
              every pattern must match;
            - a module type or tuple of types, e.g. ``nn.GroupNorm`` (``isinstance``);
            - a predicate ``(name, module) -> bool`` over ``named_modules()``;
            - ``"all"``: every ``BatchNorm2d``, ``SyncBatchNorm``, ``GroupNorm``,
              ``InstanceNorm2d`` (subclasses included) and ``LayerNorm2d``
              (:data:`ALL_NORM_TYPES`);
            - ``None`` (the default) raises: there is no sensible default placement.

            Types and ``"all"`` never select the LayerNorm inside existing CE blocks.
        mode: ``"ce"``, ``"bd"`` or ``"ir"`` (paper Table 4).
        **ce_kwargs: further keyword arguments of :class:`~cenet.layers.ChannelEquilibrium`
            (``group_size``, ``num_iters``, ``pool``, ``identity_init``, ...); an unknown one
            raises ``TypeError`` there. ``identity_init=True`` leaves the outputs of a
            pretrained network unchanged until fine-tuning opens the gates.

    Returns:
        The converted ``model`` (a new :class:`NormCE` only if the root itself was selected).

    Raises:
        ValueError: for a missing or empty selection or a pattern that matches nothing (see
            :func:`select_norms`); a selected module whose channel count is unknown (not a
            norm layer); a norm that already has a CE from an earlier conversion (the
            :class:`NormCE` itself, e.g. ``after="bn1"`` given twice, or the norm inside it,
            or a norm-act layer whose ``act`` is a :class:`CEAct`; the message names the
            module); invalid CE
            arguments (the message names the norm), e.g. a group size not dividing C.
        TypeError: for an unknown keyword argument of ``ChannelEquilibrium``.
    """
    selected = select_norms(model, after)
    parents: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                parents.setdefault(id(child), []).append((parent, attr))
    plan: list[tuple[str, nn.Module, nn.Module]] = []  # (name, norm, new block)
    for name, norm in selected:
        label = f"{name or '<root>'} ({type(norm).__name__})"
        if isinstance(norm, ChannelEquilibrium):
            raise ValueError(f"{label} is itself a CE block, not a norm layer")
        if isinstance(norm, NormCE):
            raise ValueError(
                f"{label} already has a CE from an earlier convert_ce (it is the norm "
                f"{type(norm.norm).__name__} wrapped with its CE); convert each norm once"
            )
        if any(isinstance(p, NormCE) and a == "norm" for p, a in parents.get(id(norm), [])) or (
            isinstance(norm._modules.get("act"), CEAct)
        ):
            raise ValueError(
                f"{label} already has a CE from an earlier convert_ce; convert each norm once"
            )
        channels = norm_channels(norm)
        if channels is None:
            raise ValueError(
                f"{label} is not a normalization layer with a channel count (num_features, "
                f"num_channels, normalized_shape or a 1-D weight); select norm layers only"
            )
        try:
            ce = ChannelEquilibrium(channels, mode=mode, **{**_factory(norm), **ce_kwargs})
        except ValueError as err:
            raise ValueError(f"cannot build the CE for {label}, {channels} channels: {err}") \
                from None
        ce.train(norm.training)
        plan.append((name, norm, ce))
    # all blocks built: now change the model (nothing was touched before this point)
    root = model
    for _name, norm, ce in plan:
        if _is_norm_act(norm):
            norm._modules["act"] = CEAct(ce, norm._modules["act"])
            continue
        wrapper = NormCE(norm, ce)
        for parent, attr in parents.get(id(norm), []):
            parent._modules[attr] = wrapper
        if norm is model:
            root = wrapper
    return root
