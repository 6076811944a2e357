"""One training session of a run directory in one process: set-up, checkpoint state and the
run's summary (:class:`RunSession`; the loop itself is :mod:`cenet.train.loop`).

Set-up happens in three phases so that an error on one process stops all of them with the
same message (:func:`cenet.train.distributed.agree`): everything local (data, model, sync
conversion, optimizer, schedule, EMA, gradient scaler, the checkpoint's state); then, on
rank 0 only, the run directory and ``config.yaml``; then the collectives (DDP wrapping).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cenet.data.seeding import derive_seed
from cenet.train import distributed
from cenet.train.checkpoint import FORMAT_VERSION, CheckpointError, load_states
from cenet.train.config import TrainConfig
from cenet.train.metrics import MetricsLog
from cenet.train.optim import build_optimizer
from cenet.train.parallel import (
    check_batch_split,
    check_sync_settings,
    convert_sync,
    distribute,
    prepare_model,
)
from cenet.train.rundir import prepare_new_run_dir, write_config
from cenet.train.runtime import (
    build_data,
    build_model,
    resolve_threads,
    restore_rng,
    seed_everything,
    setup_torch,
    to_device,
)
from cenet.train.schedule import build_scheduler
from cenet.train.state import TrainState

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """Summary of a finished run (the same on every process).

    Attributes:
        run_dir: the run directory.
        epochs: epochs completed.
        final_top1: test top-1 (%) at the end (after the last epoch, or at ``max_steps``).
        final_top5: test top-5 (%) at the end.
        final_test_loss: test loss at the end.
        best_top1: best test top-1 (%) of all evaluations.
        best_epoch: epoch (from 1) of ``best_top1``.
        wall_time_s: time spent training and evaluating, summed over resumed sessions.
        train_time_s: time spent in training iterations only.
        images_per_s: training images per second of ``train_time_s`` (all processes).
        metrics: the records of ``metrics.jsonl``.
        global_step: optimizer steps done in total.
        stopped_at_max_steps: training ended because ``max_steps`` was reached.
    """

    run_dir: Path
    epochs: int
    final_top1: float
    final_top5: float
    final_test_loss: float
    best_top1: float
    best_epoch: int | None
    wall_time_s: float
    train_time_s: float
    images_per_s: float
    metrics: list[dict[str, Any]] = field(repr=False)
    global_step: int = 0
    stopped_at_max_steps: bool = False


def check_session(cfg: TrainConfig, ctx: distributed.DistContext) -> None:
    """Refuse a config whose device or backend differs from what the process group was
    started with (a resumed run on a node that could not read the checkpoint)."""
    if not ctx.distributed:
        return
    backend = cfg.dist_backend or distributed.default_backend(ctx.device)
    if torch.device(cfg.device).type != ctx.device.type or backend != ctx.backend:
        raise ValueError(
            f"rank {ctx.rank} started on {ctx.device} with backend {ctx.backend}, but the run's "
            f"config has device={cfg.device!r}, dist_backend={cfg.dist_backend!r}; when "
            f"resuming on nodes without the run directory pass --device and --dist-backend "
            f"as the run was started"
        )


class RunSession:
    """One training session (new or resumed) of a run directory, in one process: built ready
    to train (see the module doc); :class:`cenet.train.loop` adds the loop."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        ckpt: dict[str, Any] | None,
        ctx: distributed.DistContext,
        *,
        bar: bool,
        overwrite: bool,
    ) -> None:
        self.session_start = time.perf_counter()
        self.ctx, self.run_dir, self.bar = ctx, run_dir, bar
        with distributed.agree("setting up the run"):  # no collective inside
            self._setup(cfg, ckpt)
        with distributed.agree("preparing the run directory"):
            if ctx.is_main:  # only now that data, model and schedule are known to work
                self._prepare_files(new=ckpt is None, overwrite=overwrite)
        distribute(self.tm, world_size=ctx.world_size, compile_model=self.cfg.compile)
        self._log_start(ckpt)

    def _setup(self, cfg: TrainConfig, ckpt: dict[str, Any] | None) -> None:
        ctx = self.ctx
        check_session(cfg, ctx)
        self.micro_batch = check_batch_split(cfg, ctx.world_size)
        self.device = setup_torch(cfg, device=ctx.device, processes_per_node=ctx.local_world_size)
        seed_everything(cfg.seed)
        self.train_loader, self.test_loader, self.info = build_data(
            cfg, num_replicas=ctx.world_size, rank=ctx.rank, pin_memory=self.device.type == "cuda"
        )
        self.cfg = cfg = cfg.replace(
            num_classes=cfg.num_classes or self.info.num_classes,
            out=str(self.run_dir),
            threads=resolve_threads(cfg.threads, ctx.local_world_size),
        )
        check_sync_settings(cfg, ctx.world_size, self.device)
        self.iters_per_epoch = len(self.train_loader)
        if self.iters_per_epoch < 1:
            raise ValueError("the training loader has no batch")
        model = to_device(build_model(cfg, cfg.num_classes), self.device, cfg.channels_last)
        model = convert_sync(model, cfg, ctx.world_size)
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.iters_per_epoch)
        self.tm = prepare_model(model, cfg, self.device)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.log = MetricsLog(self.run_dir / "metrics.jsonl")
        self.state = TrainState()
        self.rng_to_restore: dict[str, Any] | None = None
        self.elapsed_base = 0.0
        if ckpt is not None:
            self._restore(ckpt)
        if ctx.world_size > 1 and self.rng_to_restore is None:
            # the weights are initialized alike everywhere; dropout etc. differ per process
            torch.manual_seed(derive_seed(cfg.seed, "rank", ctx.rank, self.state.global_step))

    def _prepare_files(self, *, new: bool, overwrite: bool) -> None:
        if new:
            prepare_new_run_dir(self.run_dir, overwrite=overwrite)
        write_config(self.run_dir, self.cfg)
        if not new:  # drop records written after the checkpoint (no epoch appears twice)
            self.log.truncate_to_checkpoint(
                self.state.epoch, self.state.global_step, finished=self._finished()
            )

    def _log_start(self, ckpt: dict[str, Any] | None) -> None:
        cfg, ctx, s = self.cfg, self.ctx, self.state
        logger.info(
            "run %s: %s on %s (%d train / %d test images, %d iterations per epoch), %s",
            self.run_dir,
            cfg.model,
            self.info.name,
            self.info.num_train,
            self.info.num_test,
            self.iters_per_epoch,
            f"resumed at epoch {s.epoch} step {s.step}" if ckpt is not None else "new",
        )
        logger.info(
            "world size %d (%s), device %s | global batch %d, %d per process, %d accumulation "
            "step%s of %d images | peak lr %g | amp %s | sync_ce %s, sync_bn %s | EMA %s | "
            "compile %s, channels_last %s",
            ctx.world_size,
            ctx.backend or "no process group",
            self.device,
            cfg.batch_size,
            cfg.batch_size // ctx.world_size,
            cfg.grad_accum_steps,
            "" if cfg.grad_accum_steps == 1 else "s",
            self.micro_batch,
            cfg.lr,
            cfg.amp or "off (float32)",
            _on(cfg.sync_ce),
            _on(cfg.sync_bn),
            f"decay {cfg.model_ema_decay}" if cfg.model_ema_decay is not None else "off",
            _on(cfg.compile),
            _on(cfg.channels_last),
        )

    # ------------------------------------------------------------------ checkpoint state

    def _restore(self, ckpt: dict[str, Any]) -> None:
        if ckpt.get("iters_per_epoch") != self.iters_per_epoch:
            raise CheckpointError(
                f"the checkpoint was written with {ckpt.get('iters_per_epoch')} iterations per "
                f"epoch, the data now gives {self.iters_per_epoch}: the training data or batch "
                f"size changed, the run cannot be resumed identically"
            )
        tm = self.tm
        load_states(
            ckpt,
            {
                "model": tm.raw,
                "optimizer": self.optimizer,
                "scheduler": self.scheduler,
                "model_ema": tm.ema,
                "scaler": tm.scaler,
            },
            what=f"model {self.cfg.model!r}",
        )
        self.state = TrainState.from_dict(ckpt.get("state", {}))
        self.state.epoch, self.state.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.state.global_step = int(ckpt["global_step"])
        self.state.best_top1 = float(ckpt["best_top1"])
        self.elapsed_base = self.state.elapsed_s
        world, accum = self.ctx.world_size, self.cfg.grad_accum_steps
        old_world = int(ckpt.get("world_size", 1))
        old_accum = int(ckpt.get("grad_accum_steps", ckpt["config"].get("grad_accum_steps", 1)))
        states = ckpt.get("rng_states")
        if states is not None and len(states) == world:
            self.rng_to_restore = dict(states[self.ctx.rank])
        elif world == 1:
            self.rng_to_restore = {"cpu": ckpt["rng_state"], "cuda_all": ckpt.get("cuda_rng_state")}
        if world * accum != old_world * old_accum and self.ctx.is_main:
            logger.warning(
                "resumed with %d process(es) x %d micro-batches, the checkpoint was written with "
                "%d x %d: micro-batches now hold %d images instead of %d, so batch statistics "
                "(BN, CE) and the results differ from an uninterrupted run; keep processes x "
                "grad_accum_steps = %d to continue identically",
                world, accum, old_world, old_accum, self.cfg.batch_size // (world * accum),
                self.cfg.batch_size // (old_world * old_accum), old_world * old_accum,
            )  # fmt: skip

    def _set_rng(self) -> None:
        rng, self.rng_to_restore = self.rng_to_restore, None
        restore_rng(rng, self.device)

    def checkpoint(self, rng_states: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint dict of the current state (see :mod:`cenet.train.checkpoint`), with
        ``rng_states`` (every process's RNG states, by rank) besides rank 0's ``rng_state``,
        the EMA (``model_ema``), the gradient scaler (``scaler``), the world size and the
        accumulation steps it was written with."""
        s, tm = self.state, self.tm
        s.elapsed_s = self.elapsed_base + (time.perf_counter() - self.session_start)
        ckpt: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "model": tm.raw.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": s.epoch,
            "step": s.step,
            "global_step": s.global_step,
            "iters_per_epoch": self.iters_per_epoch,
            "best_top1": s.best_top1,
            "config": self.cfg.to_dict(),
            "rng_state": torch.get_rng_state(),
            "rng_states": rng_states,
            "world_size": self.ctx.world_size,
            "grad_accum_steps": self.cfg.grad_accum_steps,
            "state": s.to_dict(),
            "torch_version": str(torch.__version__),
        }
        if tm.ema is not None:
            ckpt["model_ema"] = tm.ema.state_dict()
        if tm.scaler is not None:
            ckpt["scaler"] = tm.scaler.state_dict()
        if self.device.type == "cuda":
            ckpt["cuda_rng_state"] = torch.cuda.get_rng_state_all()
        return ckpt

    def _max_reached(self) -> bool:
        return self.cfg.max_steps is not None and self.state.global_step >= self.cfg.max_steps

    def _finished(self) -> bool:
        return self.state.epoch >= self.cfg.epochs or self._max_reached()

    def result(self) -> TrainResult:
        """The run's summary (reads ``metrics.jsonl``: rank 0 only)."""
        s = self.state
        records = self.log.read()
        final = records[-1] if records else {}
        train_s = s.train_s + (s.epoch_train_s if s.step else 0.0)
        images = s.images + (s.epoch_seen if s.step else 0)
        return TrainResult(
            run_dir=self.run_dir,
            epochs=s.epoch,
            final_top1=_num(final.get("test_top1")),
            final_top5=_num(final.get("test_top5")),
            final_test_loss=_num(final.get("test_loss")),
            best_top1=s.best_top1,
            best_epoch=s.best_epoch,
            wall_time_s=self.elapsed_base + (time.perf_counter() - self.session_start),
            train_time_s=train_s,
            images_per_s=images / train_s if train_s > 0 else math.nan,
            metrics=records,
            global_step=s.global_step,
            stopped_at_max_steps=self._max_reached() and s.epoch < self.cfg.epochs,
        )


def _num(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _on(flag: bool) -> str:
    return "on" if flag else "off"
