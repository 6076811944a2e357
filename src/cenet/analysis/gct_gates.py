"""Statistics of the GCT parameters and gates (GCT paper, Yang et al. CVPR 2020, Fig. 3)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cenet.analysis._common import (
    inference_mode,
    iter_images,
    model_device,
    summary,
    to_jsonable,
)
from cenet.analysis.hooks import forward_hooks
from cenet.analysis.selection import LayerSpec, select_modules
from cenet.layers import GatedChannelTransformation


@dataclass
class GCTParameters:
    """α, γ, β (C,) float32 CPU copies of one GCT module and ``{"mean", "std", "min", "max"}``
    of each (``stats["gamma"]`` etc.)."""

    alpha: Tensor
    gamma: Tensor
    beta: Tensor
    stats: dict[str, dict[str, float]]

    def to_dict(self) -> dict:
        """A JSON-serializable dict."""
        return to_jsonable(self)


def gct_parameters(
    model: nn.Module, *, layers: LayerSpec | None = None
) -> dict[str, GCTParameters]:
    """α, γ, β of every selected :class:`GatedChannelTransformation` (default all of them),
    by module name in ``named_modules`` order (GCT paper Fig. 3: the distribution of γ per
    layer shows where the gates cooperate (γ > 0) or compete (γ < 0)).

    Raises:
        ValueError: if the selection matches no module, or a selected module is not a GCT.
    """
    modules = select_modules(model, layers, default=GatedChannelTransformation)
    result = {}
    for name, module in modules.items():
        if not isinstance(module, GatedChannelTransformation):
            raise ValueError(f"module {name!r} is a {type(module).__name__}, not a GCT")
        params = {k: getattr(module, k).detach().float().cpu().clone()
                  for k in ("alpha", "gamma", "beta")}
        stats = {k: summary(v) for k, v in params.items()}
        result[name] = GCTParameters(**params, stats=stats)
    return result


def gct_gate_values(
    model: nn.Module,
    loader: Iterable,
    *,
    layers: LayerSpec | None = None,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
) -> dict[str, Tensor]:
    """The gates 1 + tanh(γ ŝ + β) (GCT paper Eqn 4) of each selected GCT over a loader:
    key (as in :func:`cenet.analysis.hooks.call_key`) -> (N_total, C) float32 CPU tensor,
    values in [0, 2] (``gates[key].mean(0)`` is the mean gate per channel). Eval mode,
    ``torch.no_grad()``, training flags restored.

    Raises:
        ValueError: for an empty selection or loader, or a selected module that is not a GCT.
    """
    modules = select_modules(model, layers, default=GatedChannelTransformation)
    for name, module in modules.items():
        if not isinstance(module, GatedChannelTransformation):
            raise ValueError(f"module {name!r} is a {type(module).__name__}, not a GCT")
    gates: dict[str, list[Tensor]] = {}

    def hook(key: str, module: nn.Module, inputs: tuple, _output: Tensor) -> None:
        gates.setdefault(key, []).append(module.gate(inputs[0]).float().cpu())

    dev = model_device(model, device)
    with inference_mode(model), forward_hooks(model, modules, hook):
        for images, _labels in iter_images(loader, dev, max_batches):
            model(images)
    return {k: torch.cat(v) for k, v in gates.items()}
