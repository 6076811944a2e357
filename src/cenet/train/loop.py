"""The training loop: :func:`train` runs a new run or resumes one from its ``last.pt``.

One run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one line per
epoch), ``last.pt`` (after every epoch, and every ``checkpoint_every_steps`` iterations) and
``best.pt`` (the epoch of the best test top-1 of the model, not of its EMA). A run resumed from
any ``last.pt`` ends with the same weights as an uninterrupted run: the model, EMA, optimizer,
scheduler, gradient scaler and RNG states (of every process) are restored, the data order of
an epoch is a function of (seed, epoch), and the batches of the epoch in progress that were
already trained on are skipped.

Under ``torchrun`` (see :mod:`cenet.train.distributed`) every process runs this loop on its
share of each global batch inside ``DistributedDataParallel`` (:mod:`cenet.train.parallel`).
Rank 0 alone touches the run directory: it checks or prepares it, reads the checkpoint to
resume and sends it to the others (so only rank 0's node needs the run directory), and writes
``config.yaml``, ``metrics.jsonl`` and the checkpoints; an error in its setup is raised on
every process. Training metrics and evaluation are summed over the processes.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cenet.train import distributed
from cenet.train.channel_record import channel_health
from cenet.train.checkpoint import (
    atomic_save,
    load_checkpoint,
    peek_config,
    remove_stale_temp_files,
)
from cenet.train.config import TrainConfig, config_from_dict
from cenet.train.evaluate import EvalResult, evaluate
from cenet.train.metrics import percent
from cenet.train.parallel import train_step
from cenet.train.progress import EpochProgress
from cenet.train.rundir import check_new_run_dir, resume_checkpoint_path, resume_config, run_dir_of
from cenet.train.runtime import rng_state
from cenet.train.session import RunSession, TrainResult

__all__ = ["TrainResult", "resume_training", "train"]

logger = logging.getLogger(__name__)

_Opened = tuple[dict[str, Any], str, dict[str, Any] | None]  # (config, run dir, checkpoint)


def train(
    cfg: TrainConfig,
    *,
    resume_from: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.dataset`` as configured; see the module doc for the files.

    Started by ``torchrun`` (the ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` variables set), this
    initializes the process group for the call and trains data-parallel; otherwise it trains
    in this process alone.

    Args:
        cfg: the run's config. When resuming, it must match the checkpoint's config except for
            the keys of :data:`cenet.train.rundir.RESUME_MUTABLE`.
        resume_from: a checkpoint file or run directory to continue; ``None`` starts a new run
            in ``cfg.out``.
        overwrite: for a new run, replace the run files in a non-empty ``cfg.out``.
        progress: a tqdm bar per epoch (True) or INFO progress lines every ``log_interval``
            iterations (False); ``None`` = the bar only on a terminal and when the ``CI``
            environment variable is unset. Only rank 0 reports.

    Returns:
        The :class:`TrainResult`.

    Raises:
        FileExistsError: for a new run into a non-empty directory without ``overwrite``.
        FileNotFoundError: if the checkpoint to resume does not exist.
        CheckpointError: if it is not a cenet checkpoint or does not fit the model or data.
        ValueError: for a config that differs from the checkpoint's, or invalid settings
            (e.g. a batch size that the processes and micro-batches do not divide).
    """

    def open_run() -> _Opened:
        if resume_from is None:
            return cfg.to_dict(), str(check_new_run_dir(run_dir_of(cfg), overwrite=overwrite)), None
        path = resume_checkpoint_path(resume_from, cfg)
        ckpt = load_checkpoint(path)
        resumed = resume_config(ckpt["config"], cfg.to_dict(), path.parent)
        remove_stale_temp_files(path.parent)
        return resumed.to_dict(), str(path.parent), ckpt

    return _session(cfg.device, cfg.dist_backend, open_run, overwrite=overwrite, progress=progress)


def resume_training(
    checkpoint: str | os.PathLike[str],
    overrides: dict[str, Any] | None = None,
    *,
    progress: bool | None = None,
) -> TrainResult:
    """Continue the run of ``checkpoint`` (a ``last.pt`` or its run directory) with its stored
    config; ``overrides`` may change only the keys of
    :data:`cenet.train.rundir.RESUME_MUTABLE`.

    Under ``torchrun`` only rank 0 reads the checkpoint. The device and backend have to be
    known before the process group exists: they are taken from ``overrides``, else from the
    checkpoint where this process can read it, else the defaults (CPU, auto backend); a
    process whose guess differs from the checkpoint's config stops with an error asking for
    ``--device``/``--dist-backend`` (only on nodes without the run directory).

    Raises:
        The errors of :func:`train`.
    """
    overrides = dict(overrides or {})

    def open_run() -> _Opened:
        path = resume_checkpoint_path(checkpoint, TrainConfig())
        ckpt = load_checkpoint(path)
        cfg = resume_config(ckpt["config"], overrides, path.parent)
        remove_stale_temp_files(path.parent)
        return cfg.to_dict(), str(path.parent), ckpt

    stored = {} if {"device", "dist_backend"} <= overrides.keys() else peek_config(checkpoint)
    device = overrides.get("device") or stored.get("device") or TrainConfig.device
    backend = (
        overrides["dist_backend"] if "dist_backend" in overrides else stored.get("dist_backend")
    )
    return _session(device, backend, open_run, overwrite=False, progress=progress)


def _session(
    device: str,
    backend: str | None,
    open_run: Callable[[], _Opened],
    *,
    overwrite: bool,
    progress: bool | None,
) -> TrainResult:
    with distributed.session(device, backend) as ctx:
        cfg_dict, run_dir, ckpt = distributed.run_on_main(open_run, weights_only=True)
        cfg = config_from_dict(cfg_dict, source="run config")
        if progress is None:
            progress = sys.stderr.isatty() and not os.environ.get("CI")
        run = _Run(cfg, Path(run_dir), ckpt, ctx, bar=progress, overwrite=overwrite)
        del ckpt
        run.run()
        return distributed.run_on_main(run.result)


class _Run(RunSession):
    """A :class:`RunSession` with the training loop."""

    def _save(self, names: tuple[str, ...]) -> None:
        """Write the checkpoint to ``names`` in the run directory (rank 0; every rank must
        call this, as it gathers the RNG states of all processes)."""
        rng_states = distributed.all_gather_objects(rng_state(self.device))
        if not self.ctx.is_main:
            return
        ckpt = self.checkpoint(rng_states)
        for name in names:
            atomic_save(ckpt, self.run_dir / name)

    def run(self) -> None:
        """Train until the last epoch or ``max_steps``."""
        cfg = self.cfg
        if self._finished():
            logger.info(
                "run %s is already complete (%s)",
                self.run_dir,
                f"{cfg.epochs} epochs" if not self._max_reached() else f"max_steps={cfg.max_steps}",
            )
        while not self._finished():
            self._train_epoch()
            self._end_epoch()

    def _train_epoch(self) -> None:
        cfg, s, tm = self.cfg, self.state, self.tm
        tm.forward.train()
        # start_batch: skip the batches trained on before a mid-epoch checkpoint
        self.train_loader.set_epoch(s.epoch, start_batch=s.step)
        if s.step == 0:
            s.epoch_loss_sum, s.epoch_correct, s.epoch_seen, s.epoch_train_s = 0.0, 0, 0, 0.0
            s.epoch_bad_images = 0
            s.epoch_lr = self.optimizer.param_groups[0]["lr"]
        bad_before = s.epoch_bad_images  # of earlier sessions of this epoch
        batches = iter(self.train_loader)
        self._set_rng()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, hits, images
        stop = False
        tick = time.perf_counter()
        with EpochProgress(
            epoch=s.epoch + 1,
            epochs=cfg.epochs,
            total=self.iters_per_epoch,
            initial=s.step,
            enabled=self.ctx.is_main,
            bar=self.bar,
        ) as progress:
            for images, labels in batches:
                loss_sum, hits, count = train_step(
                    tm, self.optimizer, self.scheduler, self.criterion, images, labels
                )
                sums[0] += loss_sum
                sums[1] += hits
                sums[2] += count
                s.step += 1
                s.global_step += 1
                progress.advance()
                last = s.step == self.iters_per_epoch
                stop = self._max_reached()
                ckpt_due = (
                    cfg.checkpoint_every_steps > 0
                    and s.global_step % cfg.checkpoint_every_steps == 0
                    and not (last or stop)
                )
                if ckpt_due or last or stop or s.step % cfg.log_interval == 0:
                    now = time.perf_counter()
                    s.epoch_train_s += now - tick
                    tick = now
                    bad = len(getattr(self.train_loader, "bad_images", ()))
                    loss, hit, seen, skipped = distributed.all_reduce_sum([*sums.tolist(), bad])
                    sums.zero_()
                    s.epoch_loss_sum += loss
                    s.epoch_correct += int(hit)
                    s.epoch_seen += int(seen)
                    s.epoch_bad_images = bad_before + int(skipped)
                    if not math.isfinite(s.epoch_loss_sum):
                        raise FloatingPointError(
                            f"training loss is {s.epoch_loss_sum} at epoch {s.epoch + 1} step "
                            f"{s.step}; lower the learning rate (lr={cfg.lr})"
                        )
                    progress.report(
                        s.step,
                        loss=s.epoch_loss_sum / s.epoch_seen,
                        top1=percent(s.epoch_correct, s.epoch_seen),
                        images_per_s=s.epoch_seen / max(s.epoch_train_s, 1e-9),
                    )
                if ckpt_due:
                    self._save(("last.pt",))
                    tick = time.perf_counter()  # checkpoint writing is not training time
                if stop:
                    break
        if s.step != self.iters_per_epoch and not stop:
            raise RuntimeError(
                f"the training loader yielded {s.step} batches, its len() is {self.iters_per_epoch}"
            )

    def _evaluate(self) -> tuple[EvalResult, EvalResult | None]:
        """Test metrics of the model and of its EMA, summed over the processes' shards."""
        tm, multi = self.tm, self.ctx.distributed
        if multi:  # every rank evaluates with rank 0's running statistics (see distribute)
            distributed.broadcast_buffers(tm.raw)
            if tm.ema is not None:
                distributed.broadcast_buffers(tm.ema)
        kwargs: dict[str, Any] = dict(
            device=self.device,
            channels_last=self.cfg.channels_last,
            reduce=distributed.all_reduce_sum if multi else None,
            expected_samples=getattr(self.test_loader, "total_samples", None),
        )
        result = evaluate(tm.raw, self.test_loader, **kwargs)
        ema = evaluate(tm.ema.module, self.test_loader, **kwargs) if tm.ema is not None else None
        return result, ema

    def _end_epoch(self) -> None:
        cfg, s = self.cfg, self.state
        complete = s.step == self.iters_per_epoch  # else stopped by max_steps
        epoch = s.epoch + 1  # numbered from 1 from here on
        result = ema = None
        due = epoch % cfg.eval_every == 0 or epoch == cfg.epochs or self._max_reached()
        if due or not complete:
            result, ema = self._evaluate()
        eval_s = (result.seconds if result else 0.0) + (ema.seconds if ema else 0.0)
        s.eval_s += eval_s
        if complete:
            s.train_s += s.epoch_train_s
            s.images += s.epoch_seen
            s.bad_images += s.epoch_bad_images
        is_best = result is not None and result.top1 > s.best_top1
        if is_best:
            s.best_top1, s.best_epoch = result.top1, epoch
        step_in_epoch = s.step
        if complete:
            s.epoch, s.step = epoch, 0
        record = self._record(epoch, result, ema, eval_s, step_in_epoch if not complete else None)
        if result is not None and cfg.record_channels > 0 and self.ctx.is_main:
            record.update(
                channel_health(
                    self.tm.raw,
                    self.test_loader,
                    max_batches=cfg.record_channels,
                    device=self.device,
                )
            )
        if self.ctx.is_main:
            self.log.append(record)
        self._save(("best.pt", "last.pt") if is_best else ("last.pt",))
        ema_text = (
            f" | EMA loss {ema.loss:.4f} top-1 {ema.top1:.2f}% top-5 {ema.top5:.2f}%" if ema else ""
        )
        where = (
            ""
            if complete
            else f" (max_steps={cfg.max_steps} reached at step {step_in_epoch}/"
            f"{self.iters_per_epoch})"
        )
        bad_text = f" | {s.epoch_bad_images} bad images skipped" if cfg.skip_bad_images else ""
        logger.info(
            "epoch %d/%d%s lr %.4g | train loss %.4f top-1 %.2f%% | test loss %s top-1 %s "
            "top-5 %s%s%s | %.1f s, %.0f img/s",
            epoch,
            cfg.epochs,
            where,
            record["lr"],
            record["train_loss"],
            record["train_top1"],
            _fmt(record["test_loss"], "{:.4f}"),
            _fmt(record["test_top1"], "{:.2f}%"),
            _fmt(record["test_top5"], "{:.2f}%"),
            ema_text,
            bad_text,
            record["epoch_time_s"],
            record["images_per_s"] or 0.0,
        )

    def _record(
        self,
        epoch: int,
        result: EvalResult | None,
        ema: EvalResult | None,
        eval_s: float,
        partial_step: int | None,
    ) -> dict[str, Any]:
        s = self.state
        record: dict[str, Any] = {
            "epoch": epoch,
            "global_step": s.global_step,
            "lr": s.epoch_lr,
            "train_loss": s.epoch_loss_sum / s.epoch_seen,
            "train_top1": percent(s.epoch_correct, s.epoch_seen),
            "test_loss": result.loss if result else None,
            "test_top1": result.top1 if result else None,
            "test_top5": result.top5 if result else None,
        }
        if self.tm.ema is not None:
            record["test_loss_ema"] = ema.loss if ema else None
            record["test_top1_ema"] = ema.top1 if ema else None
            record["test_top5_ema"] = ema.top5 if ema else None
        record.update(
            {
                "bad_images": s.epoch_bad_images,
                "epoch_time_s": s.epoch_train_s + eval_s,
                "train_time_s": s.epoch_train_s,
                "eval_time_s": eval_s,
                "images_per_s": s.epoch_seen / s.epoch_train_s if s.epoch_train_s > 0 else None,
                "wall_time_s": self.elapsed_base + (time.perf_counter() - self.session_start),
                "time": time.time(),
            }
        )
        if partial_step is not None:  # stopped by max_steps within the epoch
            record["partial"] = True
            record["step"] = partial_step
        return record


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)
