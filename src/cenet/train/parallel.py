"""The model as it is trained: synchronized statistics, DDP, ``torch.compile``, EMA and mixed
precision, and one optimizer step over gradient-accumulation micro-batches.

Wrapping order (:func:`prepare_model`, then :func:`distribute`): the network on its device and
memory format → ``sync_ce`` (:func:`cenet.convert.convert_sync_ce`) → ``sync_bn``
(``torch.nn.SyncBatchNorm.convert_sync_batchnorm``) → an EMA copy of this unwrapped network →
``DistributedDataParallel`` → ``torch.compile`` (of the DDP module, as the PyTorch DDP docs
advise: DDPOptimizer then splits the graph at gradient bucket boundaries so that
communication overlaps the backward pass). Checkpoints, evaluation and the EMA use the
unwrapped network (:attr:`TrainModel.raw`); only the training forward goes through DDP and
the compiled module.

The global batch of ``B`` images per optimizer step is split as ``B = W × A × m``: ``W``
processes, each loading ``B / W`` images (its share, positions ``r::W`` of the global batch),
cut into ``A = grad_accum_steps`` strided micro-batches ``images[a::A]`` of ``m`` images. So a
micro-batch holds positions ``r + W·a, r + W·a + W·A, ...`` of the global batch, and two
set-ups with the same ``W·A`` (e.g. 2 processes without accumulation, 1 process with 2
micro-batches) compute their batch statistics over exactly the same images.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cenet.train.config import TrainConfig
from cenet.train.runtime import batch_to_device

logger = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""``TrainConfig.amp`` values and their autocast dtypes."""


def check_batch_split(cfg: TrainConfig, world_size: int) -> int:
    """The micro-batch size ``m = batch_size / (world_size × grad_accum_steps)``.

    Raises:
        ValueError: if ``batch_size`` (the global batch) is not a multiple of
            ``world_size × grad_accum_steps``, naming the nearest valid batch sizes.
    """
    parts = world_size * cfg.grad_accum_steps
    if cfg.batch_size % parts:
        lower = cfg.batch_size // parts * parts
        upper = lower + parts
        valid = f"{lower} or {upper}" if lower > 0 else f"{upper}"
        raise ValueError(
            f"batch_size={cfg.batch_size} (the global batch per optimizer step) must be "
            f"divisible by processes x grad_accum_steps = {world_size} x "
            f"{cfg.grad_accum_steps} = {parts}: each process loads batch_size / processes "
            f"images and cuts them into grad_accum_steps equal micro-batches; use e.g. "
            f"batch_size={valid}, or another --grad-accum / --nproc_per_node"
        )
    return cfg.batch_size // parts


def check_sync_settings(cfg: TrainConfig, world_size: int, device: torch.device) -> None:
    """Refuse settings that cannot run: ``sync_bn`` with several processes on the CPU.

    torch's ``SyncBatchNorm`` only runs on GPU modules: ``DistributedDataParallel`` refuses a
    CPU module holding one ("SyncBatchNorm layers only work with GPU modules", checked with
    torch 2.14 and gloo), so this is raised at start-up instead of after the data is loaded.

    Raises:
        ValueError: for ``sync_bn`` with ``world_size > 1`` on a non-CUDA device.
    """
    if cfg.sync_bn and world_size > 1 and device.type != "cuda":
        raise ValueError(
            f"--sync-bn (sync_bn: true) needs CUDA: torch's SyncBatchNorm runs only on GPU "
            f"modules, and this run is on {device}. On the CPU, --sync-ce synchronizes the "
            f"CE/BD/IR batch statistics over the processes; BatchNorm then normalizes with "
            f"each process's micro-batch"
        )


def convert_sync(model: nn.Module, cfg: TrainConfig, world_size: int) -> nn.Module:
    """Apply ``sync_ce`` then ``sync_bn`` to ``model`` (before DDP wrapping); with one process
    both are no-ops, said in an INFO line.

    Returns:
        The (possibly new) root module.
    """
    wanted = [name for name, on in (("sync_ce", cfg.sync_ce), ("sync_bn", cfg.sync_bn)) if on]
    if not wanted:
        return model
    if world_size == 1:
        logger.info("%s: a single process, nothing to synchronize", " and ".join(wanted))
        return model
    if cfg.sync_ce:
        from cenet.convert import convert_sync_ce  # only when asked: it is not needed otherwise

        model = convert_sync_ce(model)
    if cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def amp_dtype(cfg: TrainConfig) -> torch.dtype | None:
    """The autocast dtype of ``cfg.amp`` (``None`` = float32)."""
    return AMP_DTYPES[cfg.amp] if cfg.amp else None


@dataclass
class TrainModel:
    """The network of a run and everything wrapped around it for training.

    Attributes:
        raw: the network (after sync conversion), on its device: what checkpoints hold, what
            evaluation runs and what the EMA averages.
        forward: what the training step calls: ``raw``, its DDP wrapper, or the compiled one.
        ddp: the ``DistributedDataParallel`` wrapper, ``None`` for one process.
        ema: ``AveragedModel`` of ``raw`` (weights and buffers), ``None`` without
            ``model_ema_decay``.
        scaler: ``torch.amp.GradScaler`` for ``amp="fp16"``, else ``None``.
        amp_dtype: autocast dtype, ``None`` for float32.
        device: where the model and batches are.
        channels_last: feed batches in channels-last memory format.
        accum: micro-batches per optimizer step (``grad_accum_steps``).
    """

    raw: nn.Module
    forward: nn.Module
    ddp: DistributedDataParallel | None
    ema: AveragedModel | None
    scaler: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None
    device: torch.device
    channels_last: bool
    accum: int


def prepare_model(model: nn.Module, cfg: TrainConfig, device: torch.device) -> TrainModel:
    """Wrap ``model`` (already converted by :func:`convert_sync`, on ``device``) for training in
    this process: the EMA copy and the AMP gradient scaler. Runs no collective (see
    :func:`distribute` for DDP and compilation).

    fp16 uses a ``GradScaler`` on every device (torch supports it on the CPU too, and fp16
    gradients underflow there just as on a GPU); bf16 has float32's exponent range and needs
    none.
    """
    dtype = amp_dtype(cfg)
    ema = None
    if cfg.model_ema_decay is not None:
        ema = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(cfg.model_ema_decay), use_buffers=True
        )
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    return TrainModel(
        raw=model,
        forward=model,
        ddp=None,
        ema=ema,
        scaler=scaler,
        amp_dtype=dtype,
        device=device,
        channels_last=cfg.channels_last,
        accum=cfg.grad_accum_steps,
    )


def distribute(tm: TrainModel, *, world_size: int, compile_model: bool) -> TrainModel:
    """Wrap ``tm.raw`` in ``DistributedDataParallel`` (for more than one process; a collective:
    every process must call it) and then ``torch.compile`` it if asked; sets ``tm.ddp`` and
    ``tm.forward`` and returns ``tm``.

    DDP keeps its default of syncing buffers (``forward_sync_buffers=True``, formerly
    ``broadcast_buffers=True``): at the start of every forward the buffers of rank 0 (the
    running statistics of BN and CE) are copied to the other ranks, which then update their
    copy from their own micro-batch. The running statistics that count are thus rank 0's,
    updated from its micro-batches: checkpoints (written by rank 0) hold them, and they are
    copied to every rank before each evaluation
    (:func:`cenet.train.distributed.broadcast_buffers`).
    """
    if world_size > 1:
        ids = [tm.device.index] if tm.device.type == "cuda" else None
        tm.ddp = DistributedDataParallel(tm.raw, device_ids=ids, forward_sync_buffers=True)
        tm.forward = tm.ddp
    if compile_model:
        tm.forward = torch.compile(tm.forward)
    return tm


def train_step(
    tm: TrainModel,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    criterion: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One optimizer step on this process's share of the global batch.

    The batch is cut into ``tm.accum`` strided micro-batches ``images[a::accum]``; each micro
    loss is divided by ``accum`` before its backward, and DDP's gradient all-reduce runs only
    in the backward of the last one (``no_sync`` for the others). Forward and loss run under
    ``torch.autocast`` with ``tm.amp_dtype``. Then the optimizer (through the gradient scaler
    for fp16), the scheduler and the EMA step once.

    Args:
        tm: the model and its wrappers.
        optimizer, scheduler: stepped once.
        criterion: the loss of ``(logits, labels)``, a mean over the micro-batch.
        images: float32 ``[b, C, H, W]`` (any device), ``b >= accum``.
        labels: int64 ``[b]``.

    Returns:
        ``(loss_sum, hits, b)``: float64 0-d tensor, the sum over the ``b`` images of their
        loss; int64 0-d tensor, top-1 hits; and ``b``.

    Raises:
        RuntimeError: if the batch has fewer images than micro-batches.
    """
    images, labels = batch_to_device(images, labels, tm.device, tm.channels_last)
    count, accum = int(labels.shape[0]), tm.accum
    if count < accum:
        raise RuntimeError(
            f"a batch of {count} images cannot be cut into grad_accum_steps={accum} "
            f"micro-batches (were unreadable images skipped?)"
        )
    fmt = torch.channels_last if tm.channels_last else torch.contiguous_format
    amp = tm.amp_dtype is not None
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), dtype=torch.float64, device=tm.device)
    hits = torch.zeros((), dtype=torch.int64, device=tm.device)
    for a in range(accum):
        x = images if accum == 1 else images[a::accum].contiguous(memory_format=fmt)
        y = labels if accum == 1 else labels[a::accum]
        last = a == accum - 1
        sync = contextlib.nullcontext() if tm.ddp is None or last else tm.ddp.no_sync()
        with sync:
            with torch.autocast(tm.device.type, dtype=tm.amp_dtype, enabled=amp):
                logits = tm.forward(x)
                loss = criterion(logits, y)
            scaled = loss / accum if accum > 1 else loss
            (tm.scaler.scale(scaled) if tm.scaler is not None else scaled).backward()
        loss_sum += loss.detach().double() * y.shape[0]
        hits += (logits.detach().argmax(dim=1) == y).sum()
    if tm.scaler is not None:
        tm.scaler.step(optimizer)
        tm.scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    if tm.ema is not None:
        tm.ema.update_parameters(tm.raw)
    return loss_sum, hits, count
