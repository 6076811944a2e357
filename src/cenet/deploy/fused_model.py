"""``cenet.fuse``: an eval-only copy of a network with every foldable channel map folded into
the convolution before it (CE paper §3.1, appendix E: "BD can be merged into the
convolutional layers").

The network is traced with ``torch.fx`` (the cenet layers stay leaf modules), and every
``Conv2d → map`` pair of the graph, where the convolution has no other user, becomes one
convolution (:func:`cenet.deploy.fusion.fuse_conv_affine_weights`). Foldable maps: eval-time
``BatchNorm2d`` with running statistics; BD (:class:`~cenet.layers.BatchDecorrelation`, and a
CE block in ``"bd"`` mode, λ ≡ 1); :class:`~cenet.layers.IterNorm` and
:class:`~cenet.layers.DecorrelatedBatchNorm`. Chains fold in order (conv → BN → BD is one
convolution, at no extra cost). A CE block in ``"ce"`` or ``"ir"`` mode keeps its per-sample
IR gate, so it stays a module: in eval it applies λ·W_run + Diag(gate_n·(1 − λ)·s^{-1/2}) as
one block-diagonal product per sample (Eqn 4), after the BN before it has been folded away.
SE and GCT gate each sample and stay as they are.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn

from cenet.deploy.fusion import fuse_conv_affine_weights, whitening_affine
from cenet.layers import (
    BatchDecorrelation,
    ChannelEquilibrium,
    DecorrelatedBatchNorm,
    GatedChannelTransformation,
    InstanceReweighting,
    IterNorm,
    SqueezeExcitation,
)

LEAF_TYPES: tuple[type[nn.Module], ...] = (
    ChannelEquilibrium, BatchDecorrelation, InstanceReweighting, SqueezeExcitation,
    GatedChannelTransformation, IterNorm, DecorrelatedBatchNorm,
)
"""Modules ``torch.fx`` keeps whole when tracing (their forward checks shapes in Python)."""


@dataclass(frozen=True)
class Folded:
    """One map folded into a convolution: the convolution's and the map's qualified names,
    and the map's class name."""

    conv: str
    module: str
    kind: str


class FusedModel(fx.GraphModule):
    """The eval-only network :func:`fuse` returns (a ``torch.fx.GraphModule``).

    Attributes:
        folded: the :class:`Folded` maps, in graph order.

    Raises:
        RuntimeError: from ``train(True)``: the folded maps no longer exist, fuse after
            training.
    """

    folded: tuple[Folded, ...] = ()

    def train(self, mode: bool = True) -> FusedModel:
        if mode:
            raise RuntimeError(
                "a fused model is for inference only: its norm and BD layers are folded into "
                "the convolutions; train the original model and call cenet.fuse() again"
            )
        return super().train(False)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LEAF_TYPES) or super().is_leaf_module(m, module_qualified_name)


def affine_map(module: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """The eval-time map of ``module`` as ``(matrix (G, g, g), shift (C,) or None)`` in
    float64, or None if it is not a fixed affine map of its input (a CE block with an IR
    branch, SE, GCT, a BN without running statistics, anything else)."""
    with torch.no_grad():
        if isinstance(module, nn.BatchNorm2d):
            if module.running_mean is None or module.running_var is None:
                return None
            scale = (module.running_var.double() + module.eps).rsqrt()
            shift = -module.running_mean.double() * scale
            if module.affine:
                scale = scale * module.weight.double()
                shift = shift * module.weight.double() + module.bias.double()
            return scale.reshape(-1, 1, 1), shift
        if isinstance(module, BatchDecorrelation):
            return module.running_wm.double(), None
        if isinstance(module, ChannelEquilibrium) and module.mode == "bd":
            wm = module.bd.running_wm.double()
            if module.identity_init:  # (1 − g)·x + g·W x
                gate = module.gate.double()
                eye = torch.eye(wm.shape[-1], dtype=wm.dtype, device=wm.device)
                wm = gate * wm + (1 - gate) * eye
            return wm, None
        if isinstance(module, IterNorm | DecorrelatedBatchNorm):
            return whitening_affine(module.running_mean, module.running_wm, module.weight,
                                    module.bias)
    return None


def fuse(model: nn.Module) -> FusedModel:
    """An eval-only copy of ``model`` with its foldable maps folded into convolutions.

    ``model`` is not changed. The copy's outputs equal ``model.eval()``'s up to float
    round-off (the folding is done in float64); it runs, exports (``torch.export``, ONNX) and
    compiles like any module, and refuses ``train()``.

    Args:
        model: any network ``torch.fx`` can trace with the cenet layers as leaves (every
            registered cenet model, torchvision's CNNs).

    Returns:
        A :class:`FusedModel`; ``.folded`` lists what was folded.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: if ``torch.fx`` cannot trace it (the message says why).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse expects an nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model).eval()
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # fx raises many types; say what failed and why
        raise ValueError(
            f"cannot fuse {type(model).__name__}: torch.fx could not trace it ({err})"
        ) from err
    gm = FusedModel(model, graph, class_name=f"Fused{type(model).__name__}")
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module"
                and isinstance(modules[src.target], nn.Conv2d)
                and len(src.users) == 1 and calls[src.target] == 1):
            continue
        affine = affine_map(modules[node.target])
        conv = modules[src.target]
        if affine is None or (conv.out_channels // conv.groups) % affine[0].shape[-1]:
            continue
        weight, bias = fuse_conv_affine_weights(
            conv.weight.detach(), None if conv.bias is None else conv.bias.detach(),
            *affine, conv_groups=conv.groups,
        )
        conv.weight = nn.Parameter(weight, requires_grad=False)
        conv.bias = nn.Parameter(bias, requires_grad=False)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded.append(Folded(src.target, node.target, type(modules[node.target]).__name__))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.folded = tuple(folded)
    for p in gm.parameters():
        p.requires_grad_(False)
    return gm
