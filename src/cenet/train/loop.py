"""The training loop: :func:`train` runs a new run or resumes one from its ``last.pt``.

One run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one line per
epoch), ``last.pt`` (after every epoch, and every ``checkpoint_every_steps`` iterations) and
``best.pt`` (the epoch of the best test top-1). A run resumed from any ``last.pt`` ends with the
same weights as an uninterrupted run: the model, optimizer, scheduler and RNG states are
restored, the data order of an epoch is a function of (seed, epoch), and the batches of the
epoch in progress that were already trained on are skipped.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from cenet.train.channel_record import channel_health
from cenet.train.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    atomic_save,
    load_checkpoint,
    remove_stale_temp_files,
)
from cenet.train.config import TrainConfig
from cenet.train.evaluate import EvalResult, evaluate
from cenet.train.metrics import MetricsLog, percent
from cenet.train.optim import build_optimizer
from cenet.train.rundir import (
    check_new_run_dir,
    prepare_new_run_dir,
    resume_checkpoint_path,
    resume_config,
    run_dir_of,
    write_config,
)
from cenet.train.runtime import (
    batch_to_device,
    build_data,
    build_model,
    resolve_threads,
    seed_everything,
    setup_torch,
    to_device,
)
from cenet.train.schedule import build_scheduler
from cenet.train.state import TrainState

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """Summary of a finished run.

    Attributes:
        run_dir: the run directory.
        epochs: epochs trained in total.
        final_top1: test top-1 (%) after the last epoch.
        final_top5: test top-5 (%) after the last epoch.
        final_test_loss: test loss after the last epoch.
        best_top1: best test top-1 (%) of all evaluated epochs.
        best_epoch: epoch (from 1) of ``best_top1``.
        wall_time_s: time spent training and evaluating, summed over resumed sessions.
        train_time_s: time spent in training iterations only.
        images_per_s: training images per second of ``train_time_s``.
        metrics: the records of ``metrics.jsonl``.
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


def train(
    cfg: TrainConfig,
    *,
    resume_from: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.dataset`` as configured; see the module doc for the files.

    Args:
        cfg: the run's config. When resuming, it must match the checkpoint's config except for
            the keys of :data:`cenet.train.rundir.RESUME_MUTABLE`.
        resume_from: a checkpoint file or run directory to continue; ``None`` starts a new run
            in ``cfg.out``.
        overwrite: for a new run, replace the run files in a non-empty ``cfg.out``.
        progress: show a tqdm bar per epoch; ``None`` = only on a terminal and when the ``CI``
            environment variable is unset.

    Returns:
        The :class:`TrainResult`.

    Raises:
        FileExistsError: for a new run into a non-empty directory without ``overwrite``.
        FileNotFoundError: if the checkpoint to resume does not exist.
        CheckpointError: if it is not a cenet checkpoint or does not fit the model or data.
        ValueError: for a config that differs from the checkpoint's, or invalid settings.
    """
    ckpt = None
    if resume_from is None:
        run_dir = check_new_run_dir(run_dir_of(cfg), overwrite=overwrite)
    else:
        path = resume_checkpoint_path(resume_from, cfg)
        ckpt = load_checkpoint(path)
        run_dir = path.parent
        cfg = resume_config(ckpt["config"], cfg.to_dict(), run_dir)
        remove_stale_temp_files(run_dir)
    if progress is None:
        progress = sys.stderr.isatty() and not os.environ.get("CI")
    return _Run(cfg, run_dir, ckpt, progress=progress, overwrite=overwrite).run()


def resume_training(
    checkpoint: str | os.PathLike[str],
    overrides: dict[str, Any] | None = None,
    *,
    progress: bool | None = None,
) -> TrainResult:
    """Continue the run of ``checkpoint`` (a ``last.pt`` or its run directory) with its stored
    config; ``overrides`` may change only the keys of
    :data:`cenet.train.rundir.RESUME_MUTABLE`.

    Raises:
        The errors of :func:`train`.
    """
    path = resume_checkpoint_path(checkpoint, TrainConfig())
    stored = load_checkpoint(path)["config"]
    cfg = resume_config(stored, overrides or {}, path.parent)
    return train(cfg, resume_from=path, progress=progress)


class _Run:
    """One training session (new or resumed) of a run directory."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        ckpt: dict[str, Any] | None,
        *,
        progress: bool,
        overwrite: bool,
    ) -> None:
        self.session_start = time.perf_counter()
        self.device = setup_torch(cfg)
        seed_everything(cfg.seed)
        self.train_loader, self.test_loader, info = build_data(cfg)
        self.cfg = cfg = cfg.replace(
            num_classes=cfg.num_classes or info.num_classes,
            out=str(run_dir),
            threads=resolve_threads(cfg.threads),
        )
        self.run_dir = run_dir
        self.progress = progress
        self.iters_per_epoch = len(self.train_loader)
        if self.iters_per_epoch < 1:
            raise ValueError("the training loader has no batch")
        self.model = to_device(build_model(cfg, cfg.num_classes), self.device, cfg.channels_last)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.iters_per_epoch)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        if ckpt is None:  # only now that data, model and schedule are known to work
            prepare_new_run_dir(run_dir, overwrite=overwrite)
        write_config(run_dir, cfg)
        self.log = MetricsLog(run_dir / "metrics.jsonl")
        self.state = TrainState()
        self.rng_to_restore: dict[str, Any] | None = None
        self.elapsed_base = 0.0
        if ckpt is not None:
            self._restore(ckpt)
        logger.info(
            "run %s: %s on %s (%d train / %d test images, %d iterations per epoch), %s",
            run_dir,
            cfg.model,
            info.name,
            self.train_loader.num_samples,
            self.test_loader.num_samples,
            self.iters_per_epoch,
            f"resumed at epoch {self.state.epoch} step {self.state.step}"
            if ckpt is not None
            else "new",
        )

    # ------------------------------------------------------------------ checkpoint state

    def _restore(self, ckpt: dict[str, Any]) -> None:
        if ckpt.get("iters_per_epoch") != self.iters_per_epoch:
            raise CheckpointError(
                f"the checkpoint was written with {ckpt.get('iters_per_epoch')} iterations per "
                f"epoch, the data now gives {self.iters_per_epoch}: the training data or batch "
                f"size changed, the run cannot be resumed identically"
            )
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(
                f"checkpoint does not fit model {self.cfg.model!r}: {err}"
            ) from None
        self.state = TrainState.from_dict(ckpt.get("state", {}))
        self.state.epoch, self.state.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.state.global_step = int(ckpt["global_step"])
        self.state.best_top1 = float(ckpt["best_top1"])
        self.elapsed_base = self.state.elapsed_s
        self.rng_to_restore = {"cpu": ckpt["rng_state"], "cuda": ckpt.get("cuda_rng_state")}
        self.log.truncate_to_epochs(self.state.epoch)

    def _set_rng(self) -> None:
        if self.rng_to_restore is None:
            return
        torch.set_rng_state(self.rng_to_restore["cpu"])
        if self.rng_to_restore["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.rng_to_restore["cuda"])
        self.rng_to_restore = None

    def _checkpoint(self) -> dict[str, Any]:
        s = self.state
        s.elapsed_s = self.elapsed_base + (time.perf_counter() - self.session_start)
        ckpt: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": s.epoch,
            "step": s.step,
            "global_step": s.global_step,
            "iters_per_epoch": self.iters_per_epoch,
            "best_top1": s.best_top1,
            "config": self.cfg.to_dict(),
            "rng_state": torch.get_rng_state(),
            "state": s.to_dict(),
            "torch_version": str(torch.__version__),
        }
        if self.device.type == "cuda":
            ckpt["cuda_rng_state"] = torch.cuda.get_rng_state_all()
        return ckpt

    # ------------------------------------------------------------------ loop

    def run(self) -> TrainResult:
        cfg = self.cfg
        if self.state.epoch >= cfg.epochs:
            logger.info("run %s is already complete (%d epochs)", self.run_dir, cfg.epochs)
        while self.state.epoch < cfg.epochs:
            self._train_epoch()
            self._end_epoch()
        return self._result()

    def _train_epoch(self) -> None:
        cfg, s = self.cfg, self.state
        self.model.train()
        # start_batch: skip the batches trained on before a mid-epoch checkpoint
        self.train_loader.set_epoch(s.epoch, start_batch=s.step)
        if s.step == 0:
            s.epoch_loss_sum, s.epoch_correct, s.epoch_seen, s.epoch_train_s = 0.0, 0, 0, 0.0
            s.epoch_lr = self.optimizer.param_groups[0]["lr"]
        batches = iter(self.train_loader)
        self._set_rng()
        bar = tqdm(
            total=self.iters_per_epoch,
            initial=s.step,
            desc=f"epoch {s.epoch + 1}/{cfg.epochs}",
            unit="it",
            disable=not self.progress,
            leave=False,
            dynamic_ncols=True,
        )
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        tick = time.perf_counter()
        with bar:
            for images, labels in batches:
                loss, hits = self._train_step(images, labels)
                loss_sum += loss.detach().double() * labels.shape[0]
                correct += hits
                s.epoch_seen += labels.shape[0]
                s.step += 1
                s.global_step += 1
                bar.update(1)
                last = s.step == self.iters_per_epoch
                ckpt_due = (
                    cfg.checkpoint_every_steps > 0
                    and s.global_step % cfg.checkpoint_every_steps == 0
                    and not last
                )
                if ckpt_due or last or s.step % cfg.log_interval == 0:
                    now = time.perf_counter()
                    s.epoch_train_s += now - tick
                    tick = now
                    s.epoch_loss_sum += float(loss_sum.item())
                    s.epoch_correct += int(correct.item())
                    loss_sum.zero_()
                    correct.zero_()
                    if not math.isfinite(s.epoch_loss_sum):
                        raise FloatingPointError(
                            f"training loss is {s.epoch_loss_sum} at epoch {s.epoch + 1} step "
                            f"{s.step}; lower the learning rate (lr={cfg.lr})"
                        )
                    bar.set_postfix(
                        loss=f"{s.epoch_loss_sum / s.epoch_seen:.3f}",
                        acc=f"{percent(s.epoch_correct, s.epoch_seen):.1f}",
                        ips=f"{s.epoch_seen / max(s.epoch_train_s, 1e-9):.0f}",
                        refresh=False,
                    )
                if ckpt_due:
                    atomic_save(self._checkpoint(), self.run_dir / "last.pt")
                    tick = time.perf_counter()  # checkpoint writing is not training time
        if s.step != self.iters_per_epoch:
            raise RuntimeError(
                f"the training loader yielded {s.step} batches, its len() is {self.iters_per_epoch}"
            )

    def _train_step(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch_to_device(images, labels, self.device, self.cfg.channels_last)
        logits = self.model(images)
        loss = self.criterion(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        hits = (logits.detach().argmax(dim=1) == labels).sum()
        return loss, hits

    def _end_epoch(self) -> None:
        cfg, s = self.cfg, self.state
        epoch = s.epoch + 1  # numbered from 1 from here on
        result: EvalResult | None = None
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            result = evaluate(
                self.model, self.test_loader, device=self.device, channels_last=cfg.channels_last
            )
        eval_s = result.seconds if result else 0.0
        s.train_s += s.epoch_train_s
        s.eval_s += eval_s
        s.images += s.epoch_seen
        is_best = result is not None and result.top1 > s.best_top1
        if is_best:
            s.best_top1, s.best_epoch = result.top1, epoch
        s.epoch, s.step = epoch, 0
        record = self._record(epoch, result, eval_s)
        if result is not None and cfg.record_channels > 0:
            record.update(channel_health(
                self.model, self.test_loader, max_batches=cfg.record_channels, device=self.device
            ))
        self.log.append(record)
        ckpt = self._checkpoint()
        if is_best:
            atomic_save(ckpt, self.run_dir / "best.pt")
        atomic_save(ckpt, self.run_dir / "last.pt")
        logger.info(
            "epoch %d/%d lr %.4g | train loss %.4f top-1 %.2f%% | test loss %s top-1 %s "
            "top-5 %s | %.1f s, %.0f img/s",
            epoch,
            cfg.epochs,
            record["lr"],
            record["train_loss"],
            record["train_top1"],
            _fmt(record["test_loss"], "{:.4f}"),
            _fmt(record["test_top1"], "{:.2f}%"),
            _fmt(record["test_top5"], "{:.2f}%"),
            record["epoch_time_s"],
            record["images_per_s"],
        )

    def _record(self, epoch: int, result: EvalResult | None, eval_s: float) -> dict[str, Any]:
        s = self.state
        return {
            "epoch": epoch,
            "global_step": s.global_step,
            "lr": s.epoch_lr,
            "train_loss": s.epoch_loss_sum / s.epoch_seen,
            "train_top1": percent(s.epoch_correct, s.epoch_seen),
            "test_loss": result.loss if result else None,
            "test_top1": result.top1 if result else None,
            "test_top5": result.top5 if result else None,
            "epoch_time_s": s.epoch_train_s + eval_s,
            "train_time_s": s.epoch_train_s,
            "eval_time_s": eval_s,
            "images_per_s": s.epoch_seen / s.epoch_train_s if s.epoch_train_s > 0 else None,
            "wall_time_s": self.elapsed_base + (time.perf_counter() - self.session_start),
            "time": time.time(),
        }

    def _result(self) -> TrainResult:
        s = self.state
        records = self.log.read()
        final = records[-1] if records else {}
        return TrainResult(
            run_dir=self.run_dir,
            epochs=s.epoch,
            final_top1=final.get("test_top1", math.nan),
            final_top5=final.get("test_top5", math.nan),
            final_test_loss=final.get("test_loss", math.nan),
            best_top1=s.best_top1,
            best_epoch=s.best_epoch,
            wall_time_s=self.elapsed_base + (time.perf_counter() - self.session_start),
            train_time_s=s.train_s,
            images_per_s=s.images / s.train_s if s.train_s > 0 else math.nan,
            metrics=records,
        )


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)
