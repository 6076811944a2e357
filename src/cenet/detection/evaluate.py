"""A saved detector: :func:`load_detector` (the model of a ``cenet detect train`` checkpoint)
and :func:`evaluate_checkpoint` (its COCO APs, ``cenet detect eval``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cenet.detection.batches import eval_batches
from cenet.detection.checks import build_detector, is_mask_detector
from cenet.detection.config import DetectConfig, detect_config_from_dict
from cenet.detection.engine import DetectionEval, evaluate
from cenet.detection.run_state import CHECKPOINT_KIND
from cenet.train import distributed
from cenet.train.checkpoint import CheckpointError, load_checkpoint
from cenet.train.runtime import resolve_threads


def load_detector(
    checkpoint: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, DetectConfig, dict[str, Any]]:
    """The detector of a ``cenet detect train`` checkpoint, in eval mode on ``device``.

    Args:
        checkpoint: a ``.pt`` file or a run directory (its ``last.pt``).
        device: where the model goes.

    Returns:
        ``(model, config, checkpoint dict)``.

    Raises:
        FileNotFoundError: if there is no such checkpoint.
        CheckpointError: if it is not a detection checkpoint or does not fit its detector.
    """
    ckpt = load_checkpoint(checkpoint)
    if ckpt.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(
            f"{checkpoint} is not a checkpoint of 'cenet detect train' (a classification "
            f"checkpoint? evaluate it with 'cenet eval')"
        )
    cfg = detect_config_from_dict(ckpt["config"], source=f"config of {checkpoint}")
    model = build_detector(cfg, int(ckpt["num_classes"]), backbone_checkpoint=None)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{checkpoint} does not fit detector {cfg.model!r}: {err}") from None
    return model.to(device).eval(), cfg, ckpt


def evaluate_checkpoint(
    checkpoint: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    split: str = "val2017",
    device: str = "cpu",
    batch_size: int | None = None,
    workers: int = 0,
    threads: int | None = None,
    skip_bad_images: bool = False,
    progress: bool = False,
) -> tuple[DetectionEval, DetectConfig]:
    """COCO box (and mask) APs of a saved detector on ``split`` of the COCO root ``data``.

    Under ``torchrun`` the images are split over the processes and the results gathered.

    Args:
        checkpoint: a ``.pt`` file or run directory.
        data: a COCO 2017 root.
        split: the split to evaluate (``annotations/instances_{split}.json``, ``{split}/``).
        device: ``"cpu"`` or ``"cuda[:N]"`` (``cuda:LOCAL_RANK`` under torchrun).
        batch_size: images per batch; ``None`` = the run's ``batch_size``.
        workers: DataLoader worker processes.
        threads: torch threads; ``None`` = the cores divided among the node's processes.
        skip_bad_images: skip (and count) unreadable images instead of stopping.
        progress: a tqdm bar over the batches.

    Returns:
        ``(evaluation, the run's config)``.

    Raises:
        FileNotFoundError: for a missing checkpoint or data (naming the path).
        CheckpointError: see :func:`load_detector`.
        ValueError: for category ids the model cannot hold, or no image evaluated.
    """
    from cenet.detection.data import load_coco

    with distributed.session(device) as ctx:
        torch.set_num_threads(resolve_threads(threads, ctx.local_world_size))
        root = Path(data)
        if not root.is_dir():
            raise FileNotFoundError(f"data folder {root} does not exist (or is not a folder); "
                                    f"expected a COCO 2017 root with annotations/ and {split}/")
        with distributed.agree("loading the detector"):
            model, cfg, _ = load_detector(checkpoint, device=ctx.device)
            dataset = load_coco(root, split, train=False, num_classes=cfg.num_classes,
                                with_masks=is_mask_detector(cfg.model),
                                skip_bad_images=skip_bad_images)  # fmt: skip
        loader = eval_batches(dataset, batch_size=batch_size or cfg.batch_size, workers=workers,
                              num_replicas=ctx.world_size, rank=ctx.rank)  # fmt: skip
        result = evaluate(model, loader, dataset.coco, device=ctx.device, progress=progress)
        return result, cfg
