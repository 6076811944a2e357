"""Frozen CE: the CE block with every estimate and parameter fixed, the CE counterpart of
``torchvision.ops.FrozenBatchNorm2d`` (CE paper Sec. 5.3, Table 5: the "frozen" setting of
detection fine-tuning, where a 2-image batch per GPU is too small for batch statistics)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from cenet.layers.channel_equilibrium import ChannelEquilibrium

__all__ = ["FrozenChannelEquilibrium", "parameters_to_buffers"]


def parameters_to_buffers(module: nn.Module) -> nn.Module:
    """Turn every parameter of ``module`` and its submodules into a buffer of the same name
    (so ``state_dict`` keys are unchanged and ``parameters()`` no longer yields them), in place,
    as ``FrozenBatchNorm2d`` keeps γ and β as buffers. Returns ``module``."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            del sub._parameters[name]
            sub.register_buffer(name, None if param is None else param.detach())
    return module


class FrozenChannelEquilibrium(ChannelEquilibrium):
    """A CE block that always computes its eval form (Eqn 2 with the running whitening matrix
    and the running IR scale, Eqn 32) and holds no parameters: θ (λ = sigmoid(θ)) and the IR
    gate's weights F̃ (W₁, the LayerNorm's γ, β, W₂) are buffers under their usual names, so a
    trained CE's ``state_dict`` loads into it and back. ``train()`` does not change it.

    Gradients still flow to the input (a frozen stage may feed trained ones). Build it from a
    trained block with :meth:`from_module` or, for a whole network, with
    :func:`cenet.convert.freeze_norms`.

    Args:
        num_features, **kwargs: as :class:`~cenet.layers.ChannelEquilibrium` (which rejects
            unknown keywords with ``TypeError``).

    Shape:
        input (N, C, H, W), output (N, C, H, W).
    """

    def __init__(self, num_features: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        parameters_to_buffers(self)
        super().train(False)

    @classmethod
    def from_module(cls, module: ChannelEquilibrium) -> FrozenChannelEquilibrium:
        """A frozen copy of ``module`` (a :class:`~cenet.layers.ChannelEquilibrium` or its
        synchronized version): the same configuration, a copy of its parameters and running
        buffers. ``module`` is left untouched.

        Raises:
            TypeError: if ``module`` is not a ChannelEquilibrium.
        """
        if not isinstance(module, ChannelEquilibrium):
            raise TypeError(f"from_module expects a ChannelEquilibrium, got "
                            f"{type(module).__name__}")
        frozen = cls.__new__(cls)
        state = copy.deepcopy({k: v for k, v in vars(module).items() if k != "process_group"})
        frozen.__dict__.update(state)
        parameters_to_buffers(frozen)
        nn.Module.train(frozen, False)
        return frozen

    def train(self, mode: bool = True) -> FrozenChannelEquilibrium:
        """Stays in eval mode whatever ``mode`` (as frozen BN ignores it)."""
        return self

    def uses_native(self, x: Tensor) -> bool:
        """As the base in eval; the native eval operator (no autograd formula) also serves an
        input that needs no gradient while grad mode is on, since no parameter needs one."""
        if torch.is_grad_enabled() and not x.requires_grad:
            with torch.no_grad():
                return super().uses_native(x)
        return super().uses_native(x)
