"""Channel magnitude map: ℓ2 norm across channels at each position (CE paper Fig. 3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cenet.analysis._common import inference_mode, model_device
from cenet.analysis.hooks import forward_hooks
from cenet.analysis.selection import LayerSpec, select_modules


def magnitude_map(features: Tensor) -> Tensor:
    """(H, W) float32 map of ‖x_{n,:,i,j}‖₂ (the ℓ2 norm across channels) averaged over the
    batch, of an (N, C, H, W) feature tensor (CE paper Fig. 3).

    Raises:
        ValueError: for a non-4D input.
    """
    if not isinstance(features, Tensor) or features.dim() != 4:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features)
        raise ValueError(f"magnitude_map expects an (N, C, H, W) tensor, got {shape}")
    return features.detach().double().norm(dim=1).mean(0).float()


def channel_magnitude_map(
    model: nn.Module,
    images: Tensor,
    *,
    layer: LayerSpec,
    device: torch.device | str | None = None,
) -> Tensor:
    """(H, W) channel magnitude map of the output of ``layer`` for a batch ``images``
    (N, C_in, H_in, W_in), as in CE paper Fig. 3 (after the first BN or CE layer).

    The model runs in eval mode under ``torch.no_grad()`` (training flags restored). If the
    selection matches several modules, or a module runs several times, the first output to
    be computed is used (so ``layer=nn.BatchNorm2d`` means "the first BN").

    Raises:
        ValueError: for an empty selection, if no selected module runs, or a non-4D output.
    """
    modules = select_modules(model, layer)
    captured: list[Tensor] = []

    def hook(_key: str, _module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        if not captured:
            captured.append(output)

    with inference_mode(model), forward_hooks(model, modules, hook):
        model(images.to(model_device(model, device)))
    if not captured:
        raise ValueError(f"the selected modules {list(modules)[:12]} never ran during forward")
    return magnitude_map(captured[0]).cpu()
