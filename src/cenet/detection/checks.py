"""What a detection run checks and builds before training: the detector name, the norm setting
for the processes and device, the data root, and the detector of a config
(:func:`build_detector`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cenet.detection.config import DetectConfig


def is_mask_detector(name: str) -> bool:
    """True for a Mask R-CNN name (its data needs instance masks)."""
    return name.startswith("maskrcnn")


def check_detector_name(name: str) -> None:
    """Raise the builders' ``ValueError`` (with close matches) for an unknown detector name,
    without building anything."""
    from cenet.detection import create_detector, list_detectors

    if name not in list_detectors():
        create_detector(name)  # raises the ValueError naming the close matches


def build_detector(
    cfg: DetectConfig, num_classes: int, *, backbone_checkpoint: str | None
) -> nn.Module:
    """``create_detector`` with the model settings of ``cfg``.

    Raises:
        ValueError: for an unknown name, invalid settings, a backbone checkpoint that does
            not fit, or ``detector_kwargs`` torchvision's detector does not take.
        FileNotFoundError: for a backbone checkpoint that does not exist.
    """
    from cenet.detection import create_detector

    try:
        return create_detector(
            cfg.model,
            num_classes=num_classes,
            norm=cfg.norm,
            backbone_checkpoint=backbone_checkpoint,
            trainable_backbone_layers=cfg.trainable_backbone_layers,
            min_size=cfg.min_size,
            max_size=cfg.max_size,
            **cfg.detector_kwargs,
        )
    except TypeError as err:
        raise ValueError(
            f"detector {cfg.model!r} rejected detector_kwargs={cfg.detector_kwargs!r}: {err}"
        ) from None


def check_norm_setting(cfg: DetectConfig, world_size: int, device: torch.device) -> None:
    """Refuse ``norm="sync"`` with several processes off CUDA: torch's ``SyncBatchNorm``
    runs only on GPU modules (``DistributedDataParallel`` refuses a CPU module holding one),
    as ``cenet train --sync-bn`` says (:func:`cenet.train.parallel.check_sync_settings`).

    Raises:
        ValueError: naming the settings that work.
    """
    if cfg.norm == "sync" and world_size > 1 and device.type != "cuda":
        raise ValueError(
            f"norm='sync' with {world_size} processes needs CUDA: the detector then holds "
            f"torch.nn.SyncBatchNorm layers, which run only on GPU modules, and this run is on "
            f"{device}. Use norm=frozen (--norm frozen) on the CPU, or one process (norm=sync "
            f"then trains BN and CE as plain layers)"
        )


def check_data(cfg: DetectConfig) -> Path:
    """The data root of ``cfg``.

    Raises:
        ValueError: if ``data`` is not set.
        FileNotFoundError: if it does not exist or is not a folder.
    """
    if not cfg.data:
        raise ValueError("no data: pass --data COCO_ROOT (a folder with annotations/, "
                         "train2017/ and val2017/) or set data in the config")
    root = Path(cfg.data)
    if not root.is_dir():
        raise FileNotFoundError(
            f"data folder {root} does not exist (or is not a folder); expected a COCO 2017 "
            f"root with annotations/instances_train2017.json, train2017/ and val2017/"
        )
    return root
