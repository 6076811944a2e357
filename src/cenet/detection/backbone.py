"""CE-ResNet and ResNet bodies as FPN backbones of torchvision's detectors (CE paper Sec. 5.3,
Table 5): a cenet ImageNet checkpoint loaded with its keys checked, the paper's two norm
settings, the stages torchvision leaves trainable."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from cenet.convert.frozen import freeze_norms
from cenet.convert.sync import convert_sync_ce
from cenet.layers.channel_equilibrium import ChannelEquilibrium
from cenet.models import create_model
from cenet.models.resnet import STAGE_PLANES, ResNet
from cenet.train.checkpoint import load_checkpoint

__all__ = ["NORM_SETTINGS", "LoadReport", "load_backbone_checkpoint", "resnet_fpn_backbone",
           "set_norm_setting"]

logger = logging.getLogger(__name__)

#: the paper's Table 5 settings: "frozen" (BN and CE statistics and affine parameters fixed)
#: and "sync" (BN → SyncBatchNorm, CE → SyncCE, γ and β trained, the IR gate and λ fixed);
#: beyond the paper, "train" (BN and CE as built, every parameter trained with per-process
#: batch statistics: a backbone trained from scratch, whose gate must learn)
NORM_SETTINGS = ("frozen", "sync", "train")

#: torchvision's order of unfreezing (``_resnet_fpn_extractor``): the last stages first
_TRAINABLE_ORDER = ("layer4", "layer3", "layer2", "layer1", "conv1")


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_backbone_checkpoint` did with a checkpoint's keys.

    Attributes:
        loaded: keys copied into the backbone.
        missing: backbone keys the checkpoint lacks (left at their initial values).
        unexpected: checkpoint keys the backbone lacks (ignored).
        classifier: the classifier's keys (``fc.*``), unused by a detector.
    """

    loaded: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    classifier: tuple[str, ...]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The network weights in a cenet run directory or checkpoint, or in a plain state-dict
    file (torchvision's ``.pth``), read with ``weights_only=True``."""
    if path.is_dir():
        return load_checkpoint(path)["model"]
    if not path.is_file():
        raise FileNotFoundError(f"backbone checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the weights-only unpickler fails in many ways on other files
        raise ValueError(f"backbone checkpoint {path} is not a readable torch file "
                         f"({type(err).__name__}: {err})") from None
    if isinstance(state, dict) and "format_version" in state:  # a cenet checkpoint
        state = load_checkpoint(path)["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors (give a cenet run directory, "
                         f"its last.pt, or a torchvision-style .pth state dict)")
    return state


def load_backbone_checkpoint(body: ResNet, path: str | os.PathLike[str]) -> LoadReport:
    """Load the weights of an ImageNet checkpoint into a ResNet body, checking the keys.

    Every key the two share must have the same shape. The classifier (``fc.*``) is set aside;
    missing and unexpected keys are allowed (e.g. a BN checkpoint into a CE body leaves the
    CE layers at their initial values) and logged as a warning, and returned.

    Args:
        body: the network (a :class:`~cenet.models.resnet.ResNet`), before any norm
            conversion.
        path: a cenet run directory or ``.pt`` checkpoint (``cenet train``), or a plain
            state-dict file such as torchvision's ``resnet50-0676ba61.pth``.

    Returns:
        a :class:`LoadReport`.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if no key matches (a checkpoint of another architecture) or a shared key's
            shape differs; the message names the keys.
    """
    path = Path(path)
    state = _read_state_dict(path)
    classifier = tuple(k for k in state if k.startswith("fc."))
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = body.state_dict()
    shared = [k for k in state if k in own]
    if not shared:
        raise ValueError(
            f"backbone checkpoint {path} shares no weight name with the "
            f"{type(body).__name__} body (its first keys: {list(state)[:3]}); it is not a "
            f"checkpoint of this architecture"
        )
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs body {tuple(own[k].shape)}"
             for k in shared if state[k].shape != own[k].shape]
    if wrong:
        raise ValueError(f"backbone checkpoint {path} does not fit the body ({len(wrong)} "
                         f"shapes differ, e.g. {'; '.join(wrong[:3])}): another depth or width?")
    result = body.load_state_dict({k: state[k] for k in shared}, strict=False)
    missing = tuple(k for k in result.missing_keys if not k.startswith("fc."))
    report = LoadReport(tuple(shared), missing, tuple(k for k in state if k not in own),
                        classifier)
    if report.missing or report.unexpected:
        logger.warning(
            "backbone checkpoint %s: %d tensors loaded; %d missing in the checkpoint (left at "
            "their initial values: %s); %d unexpected (ignored: %s)", path, len(shared),
            len(missing), ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""),
            len(report.unexpected),
            ", ".join(report.unexpected[:5]) + (" ..." if len(report.unexpected) > 5 else ""))
    else:
        logger.info("backbone checkpoint %s: all %d tensors loaded", path, len(shared))
    return report


def set_norm_setting(body: nn.Module, norm: str) -> nn.Module:
    """Apply one of the paper's two norm settings (Table 5) to a backbone body.

    - ``"frozen"``: BN → ``FrozenBatchNorm2d``, CE → :class:`~cenet.layers.FrozenChannelEquilibrium`
      (:func:`cenet.convert.freeze_norms`).
    - ``"sync"``: BN → ``nn.SyncBatchNorm``, CE → SyncCE (:func:`cenet.convert.convert_sync_ce`);
      BN's and the norms' γ, β train; each CE block's IR gate weights F̃ and θ (λ) get
      ``requires_grad=False``. In one process both behave as their unsynchronized bases.
    - ``"train"``: unchanged (beyond the paper): BN and CE use each process's batch and every
      parameter trains, the IR gate and λ included, as a backbone trained from scratch needs
      (a random gate frozen by ``"sync"`` would stay random).

    Returns:
        the converted body (a new object only if ``body`` itself is a norm).

    Raises:
        ValueError: for another ``norm``.
    """
    if norm == "frozen":
        return freeze_norms(body)
    if norm == "train":
        return body
    if norm != "sync":
        raise ValueError(f"norm must be one of {NORM_SETTINGS}, got {norm!r}")
    body = convert_sync_ce(nn.SyncBatchNorm.convert_sync_batchnorm(body))
    for m in body.modules():
        if isinstance(m, ChannelEquilibrium):
            if m.ir is not None:
                m.ir.requires_grad_(False)
            if m.mode == "ce":
                m.theta.requires_grad_(False)
    return body


def _freeze_stages(body: ResNet, trainable_layers: int) -> None:
    """``requires_grad=False`` outside the last ``trainable_layers`` stages (0-5), in
    torchvision's order (layer4, layer3, layer2, layer1, the stem conv; with 5 the whole stem,
    its norm and CE included)."""
    if trainable_layers == 5:
        return
    trainable = _TRAINABLE_ORDER[:trainable_layers]
    for name, param in body.named_parameters():
        if not name.startswith(trainable):
            param.requires_grad_(False)


def resnet_fpn_backbone(
    depth: int,
    *,
    ce: bool,
    norm: str = "frozen",
    trainable_layers: int = 3,
    checkpoint: str | os.PathLike[str] | None = None,
    out_channels: int = 256,
) -> BackboneWithFPN:
    """A ResNet or CE-ResNet body (cenet's ``resnet{depth}`` / ``resnet{depth}_ce``, the paper's
    CE placements) with torchvision's FPN on its four stages and a max-pooled fifth level, as
    ``torchvision.models.detection.backbone_utils.resnet_fpn_backbone`` builds for torchvision's
    ResNets.

    Order of work: build the body, load ``checkpoint`` (:func:`load_backbone_checkpoint`), apply
    the norm setting (:func:`set_norm_setting`), then freeze all but the last
    ``trainable_layers`` stages.

    Args:
        depth: 18, 34, 50 or 101.
        ce: CE-ResNet (True) or the plain BN ResNet (False).
        norm: ``"frozen"``, ``"sync"`` or ``"train"`` (:data:`NORM_SETTINGS`).
        trainable_layers: stages trained, 0-5, counted from layer4 (torchvision's meaning).
        checkpoint: an ImageNet checkpoint of the same body, or None (random initialization).
        out_channels: FPN width.

    Shape:
        input (N, 3, H, W); output an ordered dict of five maps ``"0"``..``"3"`` (strides 4,
        8, 16, 32) and ``"pool"`` (stride 64), each with ``out_channels`` channels.

    Raises:
        ValueError: for an unknown depth or norm, ``trainable_layers`` outside 0-5, or a
            checkpoint that does not fit.
    """
    if depth not in (18, 34, 50, 101):
        raise ValueError(f"depth must be 18, 34, 50 or 101, got {depth!r}")
    if isinstance(trainable_layers, bool) or trainable_layers not in range(6):
        raise ValueError(f"trainable_layers must be an int in 0-5 (stages trained, from "
                         f"layer4), got {trainable_layers!r}")
    if norm not in NORM_SETTINGS:
        raise ValueError(f"norm must be one of {NORM_SETTINGS}, got {norm!r}")
    body = create_model(f"resnet{depth}{'_ce' if ce else ''}")
    if checkpoint is not None:
        load_backbone_checkpoint(body, checkpoint)
    body = set_norm_setting(body, norm)
    _freeze_stages(body, trainable_layers)
    expansion = body.num_features // STAGE_PLANES[-1]
    return BackboneWithFPN(
        body,
        return_layers={f"layer{i + 1}": str(i) for i in range(4)},
        in_channels_list=[planes * expansion for planes in STAGE_PLANES],
        out_channels=out_channels,
        extra_blocks=LastLevelMaxPool(),
    )
