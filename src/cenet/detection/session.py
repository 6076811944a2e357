"""A detection training run: :func:`train_detector` (new run) and :func:`resume_detector`
(continue one from its ``last.pt``), both through :class:`DetectRun`; the COCO APs of a saved
model are :func:`cenet.detection.evaluate.evaluate_checkpoint`.

A run directory holds ``config.yaml`` (the resolved :class:`~cenet.detection.config.
DetectConfig`), ``metrics.jsonl`` (one JSON line per epoch: learning rate, mean training losses,
box/mask APs when evaluated, times), ``last.pt`` (written atomically every ``checkpoint_every``
iterations and at the end of every epoch) and, once training has ended, ``metrics.json`` with
the final box and mask APs.

Resuming: a checkpoint holds the model, optimizer, schedule, gradient scaler, the position
(epoch and iteration within it), the running sums of the epoch, the config and the torch RNG
state of every process. The data order of an epoch is a function of ``(seed, epoch)``
(``DistributedSampler`` seeded with it) and every training image's random flip a function of
``(seed, epoch, image index)`` (the RNG is seeded per image in the loader), so a run killed at
any moment and resumed with ``--resume`` skips the iterations of the epoch already done
(without loading their images) and continues with the same batches, flips and detector
sampling as the uninterrupted run: the same weights, bit for bit, on the same machine.

Under ``torchrun`` every process trains on its shard of each global batch inside
``DistributedDataParallel`` (gloo on the CPU, NCCL on CUDA; :mod:`cenet.train.distributed`);
rank 0 alone reads the checkpoint to resume (and sends it to the others) and writes the run
directory; an error in set-up on any process stops all of them with the same message.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cenet.data.seeding import derive_seed
from cenet.detection.batches import TrainBatches, eval_batches
from cenet.detection.checks import (
    build_detector,
    check_data,
    check_detector_name,
    check_norm_setting,
    is_mask_detector,
)
from cenet.detection.config import (
    DetectConfig,
    detect_config_from_dict,
    resume_detect_config,
    run_dir_of,
    scaled_lr,
)
from cenet.detection.engine import (
    DetectionEval,
    amp_dtype,
    build_lr_scheduler,
    evaluate,
    iou_types_of,
    train_one_epoch,
)
from cenet.detection.run_state import (
    CHECKPOINT_KIND,
    FINAL_METRICS,
    DetectResult,
    DetectState,
    LossProgress,
)
from cenet.train import distributed
from cenet.train.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    atomic_save,
    load_checkpoint,
    load_states,
    peek_config,
    remove_stale_temp_files,
)
from cenet.train.metrics import MetricsLog
from cenet.train.rundir import check_new_run_dir, prepare_new_run_dir, write_config
from cenet.train.runtime import resolve_threads, restore_rng, rng_state, seed_everything
from cenet.train.session import check_session

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the run


class DetectRun:
    """One training session (new or resumed) of a run directory in one process; built ready
    to train (data, model, optimizer, schedule, restored state, DDP), :meth:`run` trains.

    Args:
        cfg: the run's config (for a resumed run: the checkpoint's, with the allowed changes).
        run_dir: the run directory.
        ckpt: the checkpoint to resume, ``None`` for a new run.
        ctx: this process's place in the job.
        bar: a tqdm bar (else INFO lines).
        overwrite: a new run may replace the run files in a non-empty ``run_dir``.
    """

    def __init__(
        self,
        cfg: DetectConfig,
        run_dir: Path,
        ckpt: dict[str, Any] | None,
        ctx: distributed.DistContext,
        *,
        bar: bool,
        overwrite: bool,
    ) -> None:
        self.session_start = time.perf_counter()
        self.ctx, self.run_dir, self.bar = ctx, run_dir, bar
        with distributed.agree("setting up the detection run"):  # no collective inside
            self._setup(cfg, ckpt)
        with distributed.agree("preparing the run directory"):
            if ctx.is_main:
                self._prepare_files(new=ckpt is None, overwrite=overwrite)
        self.forward: nn.Module = self.model
        if ctx.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = DistributedDataParallel(self.model, device_ids=ids)
        self._log_start(ckpt)

    # ------------------------------------------------------------------ set-up

    def _setup(self, cfg: DetectConfig, ckpt: dict[str, Any] | None) -> None:
        ctx = self.ctx
        check_session(cfg, ctx)  # type: ignore[arg-type]  # reads device and dist_backend
        self.device = ctx.device
        check_norm_setting(cfg, ctx.world_size, self.device)
        check_detector_name(cfg.model)
        root = check_data(cfg)
        threads = resolve_threads(cfg.threads, ctx.local_world_size)
        torch.set_num_threads(threads)
        seed_everything(cfg.seed)
        from cenet.detection.data import load_coco

        masks = is_mask_detector(cfg.model)
        skip = cfg.skip_bad_images
        self.train_set = load_coco(root, "train2017", train=True, num_classes=cfg.num_classes,
                                   with_masks=masks, skip_bad_images=skip)  # fmt: skip
        num_classes = cfg.num_classes or self.train_set.num_classes_needed
        self.val_set = load_coco(root, "val2017", train=False, num_classes=num_classes,
                                 with_masks=masks, skip_bad_images=skip)  # fmt: skip
        self.cfg = cfg = cfg.replace(num_classes=num_classes, out=str(self.run_dir),
                                     threads=threads)  # fmt: skip
        self.train_loader = TrainBatches(
            self.train_set, batch_size=cfg.batch_size, workers=cfg.workers, seed=cfg.seed,
            num_replicas=ctx.world_size, rank=ctx.rank, pin_memory=self.device.type == "cuda",
        )  # fmt: skip
        self.val_loader = eval_batches(
            self.val_set, batch_size=cfg.batch_size, workers=cfg.workers,
            num_replicas=ctx.world_size, rank=ctx.rank,
        )  # fmt: skip
        self.iters_per_epoch = len(self.train_loader)
        model = build_detector(
            cfg, num_classes, backbone_checkpoint=cfg.backbone_checkpoint if ckpt is None else None
        )
        if iou_types_of(model) != (("bbox", "segm") if masks else ("bbox",)):
            raise ValueError(f"detector {cfg.model!r}: its mask head does not match its name")
        self.model = model.to(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"detector {cfg.model!r} has no trainable parameter")
        self.num_trainable = sum(p.numel() for p in params)
        self.lr = scaled_lr(cfg, ctx.world_size)
        self.optimizer = torch.optim.SGD(
            params, lr=self.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.scheduler = build_lr_scheduler(
            self.optimizer, iters_per_epoch=self.iters_per_epoch, milestones=cfg.milestones,
            gamma=cfg.gamma, warmup_iters=cfg.warmup_iters, warmup_factor=cfg.warmup_factor,
        )  # fmt: skip
        self.amp = amp_dtype(cfg.amp)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None
        self.log = MetricsLog(self.run_dir / "metrics.jsonl")
        self.state = DetectState()
        self.elapsed_base = 0.0
        self.rng_to_restore: dict[str, Any] | None = None
        if ckpt is not None:
            self._restore(ckpt)
        if ctx.world_size > 1 and self.rng_to_restore is None:
            # the weights are initialized alike everywhere; the detector's sampling differs
            torch.manual_seed(derive_seed(cfg.seed, "rank", ctx.rank, self.state.global_step))

    def _prepare_files(self, *, new: bool, overwrite: bool) -> None:
        if new:
            prepare_new_run_dir(self.run_dir, overwrite=overwrite)
            (self.run_dir / FINAL_METRICS).unlink(missing_ok=True)
        write_config(self.run_dir, self.cfg)
        if not new:  # drop records written after the checkpoint (no epoch appears twice)
            self.log.truncate_to_checkpoint(
                self.state.epoch, self.state.global_step, finished=self._finished()
            )

    def _log_start(self, ckpt: dict[str, Any] | None) -> None:
        cfg, ctx, s = self.cfg, self.ctx, self.state
        logger.info(
            "run %s: %s on %s (%d train / %d val images, %d classes, %d iterations per "
            "epoch), %s",
            self.run_dir, cfg.model, cfg.data, len(self.train_set), len(self.val_set),
            cfg.num_classes, self.iters_per_epoch,
            f"resumed at epoch {s.epoch + 1} iteration {s.step}" if ckpt is not None else "new",
        )  # fmt: skip
        global_batch = cfg.batch_size * ctx.world_size
        logger.info(
            "world size %d (%s), device %s | %d images per process, global batch %d | lr %g "
            "(config lr %g for a global batch of 16, x %d/16) | norm %s | amp %s | "
            "%d trainable parameters | images %d-%d px",
            ctx.world_size, ctx.backend or "no process group", self.device, cfg.batch_size,
            global_batch, self.lr, cfg.lr, global_batch, cfg.norm, cfg.amp or "off (float32)",
            self.num_trainable, cfg.min_size, cfg.max_size,
        )  # fmt: skip
        if cfg.backbone_checkpoint is None and ckpt is None:
            logger.info("no backbone checkpoint: the backbone starts from random weights")

    # ------------------------------------------------------------------ checkpoints

    def _restore(self, ckpt: dict[str, Any]) -> None:
        if ckpt.get("kind") != CHECKPOINT_KIND:
            raise CheckpointError(
                "the checkpoint is not one of 'cenet detect train' (a classification run of "
                "'cenet train'?); resume it with 'cenet train --resume'"
            )
        world = int(ckpt.get("world_size", 1))
        if world != self.ctx.world_size:
            raise CheckpointError(
                f"the checkpoint was written by {world} process(es), this run has "
                f"{self.ctx.world_size}: batch_size is per process, so another number of "
                f"processes changes the global batch, the learning rate and the data shards; "
                f"resume with --nproc_per_node {world}"
            )
        if ckpt.get("iters_per_epoch") != self.iters_per_epoch:
            raise CheckpointError(
                f"the checkpoint was written with {ckpt.get('iters_per_epoch')} iterations per "
                f"epoch, the data now gives {self.iters_per_epoch}: the training images or the "
                f"batch size changed, the run cannot be resumed identically"
            )
        load_states(
            ckpt,
            {
                "model": self.model,
                "optimizer": self.optimizer,
                "scheduler": self.scheduler,
                "scaler": self.scaler,
            },
            what=f"detector {self.cfg.model!r}",
        )
        self.state = DetectState.from_dict(ckpt.get("state", {}))
        self.state.epoch, self.state.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.state.global_step = int(ckpt["global_step"])
        self.elapsed_base = self.state.elapsed_s
        states = ckpt.get("rng_states")
        if states is not None and len(states) == self.ctx.world_size:
            self.rng_to_restore = dict(states[self.ctx.rank])

    def _set_rng(self) -> None:
        rng, self.rng_to_restore = self.rng_to_restore, None
        restore_rng(rng, self.device)

    def checkpoint(self, rng_states: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint dict of the current state: the keys of
        :mod:`cenet.train.checkpoint` (``best_top1`` is ``None``: a classification key) plus
        ``kind`` (``"detection"``), ``iters_per_epoch``, ``world_size``, ``rng_states`` (every
        process's, by rank), ``state`` (:class:`DetectState`), ``num_classes`` and, for fp16,
        ``scaler``."""
        s = self.state
        s.elapsed_s = self.elapsed_base + (time.perf_counter() - self.session_start)
        ckpt: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "kind": CHECKPOINT_KIND,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": s.epoch,
            "step": s.step,
            "global_step": s.global_step,
            "iters_per_epoch": self.iters_per_epoch,
            "best_top1": None,
            "config": self.cfg.to_dict(),
            "num_classes": self.cfg.num_classes,
            "rng_state": torch.get_rng_state(),
            "rng_states": rng_states,
            "world_size": self.ctx.world_size,
            "state": s.to_dict(),
            "torch_version": str(torch.__version__),
        }
        if self.scaler is not None:
            ckpt["scaler"] = self.scaler.state_dict()
        return ckpt

    def _save(self) -> None:
        """Write ``last.pt`` (rank 0; every rank must call this: it gathers the RNG states)."""
        rng_states = distributed.all_gather_objects(rng_state(self.device))
        if self.ctx.is_main:
            atomic_save(self.checkpoint(rng_states), self.run_dir / "last.pt")

    # ------------------------------------------------------------------ training

    def _max_reached(self) -> bool:
        return self.cfg.max_steps is not None and self.state.global_step >= self.cfg.max_steps

    def _finished(self) -> bool:
        return self.state.epoch >= self.cfg.epochs or self._max_reached()

    def run(self) -> None:
        """Train until the last epoch or ``max_steps``; then write ``metrics.json``."""
        if self._finished():
            logger.info("run %s is already complete", self.run_dir)
        while not self._finished():
            self._train_epoch()
            self._end_epoch()
        if self.ctx.is_main:
            self._write_final()

    def _sync(self, pending: list[int], bad_before: int) -> None:
        """Fold this process's image count since the last call into the state, summed over
        the processes (a collective: every process calls it at the same iterations)."""
        s = self.state
        images, bad = distributed.all_reduce_sum([pending[0], len(self.train_loader.bad_images)])
        pending[0] = 0
        s.epoch_images += int(images)
        s.epoch_bad_images = bad_before + int(bad)

    def _train_epoch(self) -> None:
        cfg, s = self.cfg, self.state
        self.train_loader.set_epoch(s.epoch, start_batch=s.step)
        if s.step == 0:
            s.epoch_loss_sums, s.epoch_iters, s.epoch_images = {}, 0, 0
            s.epoch_bad_images, s.epoch_train_s = 0, 0.0
            s.epoch_lr = self.optimizer.param_groups[0]["lr"]
        bad_before = s.epoch_bad_images  # of earlier sessions of this epoch
        batches = iter(self.train_loader)
        self._set_rng()
        pending = [0]
        tick = [time.perf_counter()]
        with LossProgress(
            epoch=s.epoch + 1, epochs=cfg.epochs, total=self.iters_per_epoch, initial=s.step,
            enabled=self.ctx.is_main, bar=self.bar,
        ) as progress:  # fmt: skip

            def after_step(step: int, losses: dict[str, float], images: int) -> bool:
                s.step = step
                s.global_step += 1
                s.epoch_iters += 1
                for key, value in losses.items():
                    s.epoch_loss_sums[key] = s.epoch_loss_sums.get(key, 0.0) + value
                pending[0] += images
                progress.advance()
                last = step == self.iters_per_epoch
                stop = self._max_reached()
                due = (
                    cfg.checkpoint_every > 0
                    and s.global_step % cfg.checkpoint_every == 0
                    and not (last or stop)
                )
                if due or last or stop or step % cfg.log_interval == 0:
                    now = time.perf_counter()
                    s.epoch_train_s += now - tick[0]
                    tick[0] = now
                    self._sync(pending, bad_before)
                    progress.report_losses(
                        step,
                        losses=self._epoch_losses(),
                        images_per_s=s.epoch_images / max(s.epoch_train_s, 1e-9),
                    )
                if due:
                    self._save()
                    tick[0] = time.perf_counter()  # checkpoint writing is not training time
                return stop

            stats = train_one_epoch(
                self.forward, self.optimizer, batches, device=self.device,
                scheduler=self.scheduler, scaler=self.scaler, amp=self.amp, epoch=s.epoch + 1,
                start_step=s.step, total=self.iters_per_epoch, after_step=after_step,
            )  # fmt: skip
        if not stats.stopped and s.step < self.iters_per_epoch:
            # single process: batches whose images were all unreadable were left out
            missing = self.iters_per_epoch - s.step
            logger.warning(
                "%d batch(es) of epoch %d held only unreadable images and were left out",
                missing, s.epoch + 1,
            )  # fmt: skip
            s.epoch_train_s += time.perf_counter() - tick[0]
            self._sync(pending, bad_before)
            for _ in range(missing):  # keep the schedule where the full epoch leaves it
                self.scheduler.step()
            s.step, s.global_step = self.iters_per_epoch, s.global_step + missing

    def _epoch_losses(self) -> dict[str, float]:
        s = self.state
        n = max(s.epoch_iters, 1)
        return {k: v / n for k, v in s.epoch_loss_sums.items()}

    def _evaluate(self) -> DetectionEval:
        if self.ctx.distributed:  # every rank evaluates with rank 0's running statistics
            distributed.broadcast_buffers(self.model)
        return evaluate(self.model, self.val_loader, self.val_set.coco, device=self.device,
                        progress=self.bar)  # fmt: skip

    def _end_epoch(self) -> None:
        cfg, s = self.cfg, self.state
        complete = s.step == self.iters_per_epoch
        epoch = s.epoch + 1
        due = epoch % cfg.eval_every == 0 or epoch == cfg.epochs or self._max_reached()
        result = self._evaluate() if due or not complete else None
        eval_s = result.seconds if result else 0.0
        s.eval_s += eval_s
        if result is not None:
            s.metrics, s.metrics_epoch = result.metrics, epoch
        record = self._record(epoch, result, eval_s, None if complete else s.step)
        if complete:
            s.train_s += s.epoch_train_s
            s.images += s.epoch_images
            s.epoch, s.step = epoch, 0
        if self.ctx.is_main:
            self.log.append(record)
        self._save()
        where = "" if complete else (
            f" (max_steps={cfg.max_steps} reached at iteration {record['step']}/"
            f"{self.iters_per_epoch})"
        )  # fmt: skip
        ap = ""
        if result is not None:
            ap = " | " + " ".join(
                f"{'box' if kind == 'bbox' else 'mask'} AP {_pct(m['AP'])} AP50 "
                f"{_pct(m['AP50'])} AP75 {_pct(m['AP75'])}"
                for kind, m in result.metrics.items()
            )
        bad = f" | {s.epoch_bad_images} bad images skipped" if cfg.skip_bad_images else ""
        logger.info(
            "epoch %d/%d%s lr %.4g | train loss %.4f%s%s | %.1f s",
            epoch, cfg.epochs, where, record["lr"], record["train_loss"], ap, bad,
            record["epoch_time_s"],
        )  # fmt: skip

    def _record(
        self, epoch: int, result: DetectionEval | None, eval_s: float, partial_step: int | None
    ) -> dict[str, Any]:
        s = self.state
        losses = self._epoch_losses()
        record: dict[str, Any] = {
            "epoch": epoch,
            "global_step": s.global_step,
            "lr": s.epoch_lr,
            "train_loss": losses.get("loss", math.nan),
            "train_losses": {k: v for k, v in losses.items() if k != "loss"},
        }
        if result is not None:
            record.update(result.metrics)
            record["eval_images"] = result.num_images
        record.update(
            {
                "bad_images": s.epoch_bad_images,
                "epoch_time_s": s.epoch_train_s + eval_s,
                "train_time_s": s.epoch_train_s,
                "eval_time_s": eval_s,
                "images_per_s": s.epoch_images / s.epoch_train_s if s.epoch_train_s else None,
                "wall_time_s": self.elapsed_base + (time.perf_counter() - self.session_start),
                "time": time.time(),
            }
        )
        if partial_step is not None:
            record["partial"] = True
            record["step"] = partial_step
        return record

    def _write_final(self) -> None:
        s, cfg = self.state, self.cfg
        final = {
            "model": cfg.model,
            "norm": cfg.norm,
            "data": cfg.data,
            "epochs": s.epoch,
            "global_step": s.global_step,
            "stopped_at_max_steps": self._max_reached() and s.epoch < cfg.epochs,
            "evaluated_after_epoch": s.metrics_epoch,
            **_nan_to_none(s.metrics or {}),
            "lr": self.lr,
            "world_size": self.ctx.world_size,
            "train_time_s": self._train_time(),
            "wall_time_s": self.elapsed_base + (time.perf_counter() - self.session_start),
        }
        path = self.run_dir / FINAL_METRICS
        tmp = path.with_name(f".{FINAL_METRICS}.tmp")
        tmp.write_text(json.dumps(final, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def _train_time(self) -> float:
        s = self.state
        return s.train_s + (s.epoch_train_s if s.step else 0.0)

    def result(self) -> DetectResult:
        """The run's summary (reads ``metrics.jsonl``: rank 0 only)."""
        s = self.state
        train_s = self._train_time()
        images = s.images + (s.epoch_images if s.step else 0)
        return DetectResult(
            run_dir=self.run_dir,
            epochs=s.epoch,
            global_step=s.global_step,
            metrics=s.metrics or {},
            records=self.log.read(),
            wall_time_s=self.elapsed_base + (time.perf_counter() - self.session_start),
            train_time_s=train_s,
            images_per_s=images / train_s if train_s > 0 else math.nan,
            lr=self.lr,
            stopped_at_max_steps=self._max_reached() and s.epoch < self.cfg.epochs,
        )


def _pct(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _nan_to_none(metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """The metrics with NaN (not measurable) as ``None``, for strict JSON."""
    return {
        kind: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}
        for kind, m in metrics.items()
    }


# ----------------------------------------------------------------------------- entry points


def _open_new(cfg: DetectConfig, overwrite: bool):
    def open_run() -> tuple[dict[str, Any], str, None]:
        check_detector_name(cfg.model)  # before anything is loaded
        check_data(cfg)
        return cfg.to_dict(), str(check_new_run_dir(run_dir_of(cfg), overwrite=overwrite)), None

    return open_run


def train_detector(
    cfg: DetectConfig, *, overwrite: bool = False, progress: bool | None = None
) -> DetectResult:
    """Train ``cfg.model`` on the COCO data of ``cfg.data`` in a new run directory
    (``cfg.out``); see the module doc for its files.

    Started by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set), this initializes
    the process group for the call and trains data-parallel; otherwise in this process.

    Args:
        cfg: the run's config.
        overwrite: replace the run files of a non-empty ``cfg.out``.
        progress: a tqdm bar (True) or INFO lines every ``log_interval`` iterations (False);
            ``None`` = ``cfg.progress``, and when that is null a bar only on a terminal with
            ``CI`` unset. Only rank 0 reports.

    Raises:
        FileExistsError: for a non-empty run directory without ``overwrite``.
        FileNotFoundError: for missing data (a :class:`cenet.detection.data.CocoLayoutError`
            names the file or folder) or backbone checkpoint.
        ValueError: for invalid settings (unknown detector, norm="sync" with several CPU
            processes, category ids the model cannot hold ...).
        FloatingPointError: for a non-finite training loss.
    """
    return _session(cfg.device, cfg.dist_backend, _open_new(cfg, overwrite),
                    overwrite=overwrite, progress=progress)  # fmt: skip


def resume_detector(
    checkpoint: str | os.PathLike[str],
    overrides: dict[str, Any] | None = None,
    *,
    progress: bool | None = None,
) -> DetectResult:
    """Continue the run of ``checkpoint`` (a ``last.pt`` or its run directory) with its stored
    config; ``overrides`` may change only the keys of
    :data:`cenet.detection.config.RESUME_MUTABLE`.

    Raises:
        FileNotFoundError: if there is no such checkpoint.
        CheckpointError: if it is not a detection checkpoint, or was written by another
            number of processes or for other data.
        ValueError: for an override of a key that must not change.
    """
    overrides = dict(overrides or {})
    path = Path(checkpoint)

    def open_run() -> tuple[dict[str, Any], str, dict[str, Any]]:
        file = path / "last.pt" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"cannot resume: checkpoint {file} does not exist")
        ckpt = load_checkpoint(file)
        if ckpt.get("kind") != CHECKPOINT_KIND:
            raise CheckpointError(
                f"{file} is not a checkpoint of 'cenet detect train' (a classification run? "
                f"resume it with 'cenet train --resume')"
            )
        cfg = resume_detect_config(ckpt["config"], overrides, file.parent)
        remove_stale_temp_files(file.parent)
        return cfg.to_dict(), str(file.parent), ckpt

    stored = {} if {"device", "dist_backend"} <= overrides.keys() else peek_config(path)
    device = overrides.get("device") or stored.get("device") or DetectConfig.device
    backend = overrides["dist_backend"] if "dist_backend" in overrides else stored.get(
        "dist_backend")  # fmt: skip
    return _session(device, backend, open_run, overwrite=False, progress=progress)


def _session(device: str, backend: str | None, open_run, *, overwrite: bool,
             progress: bool | None) -> DetectResult:  # fmt: skip
    with distributed.session(device, backend) as ctx:
        cfg_dict, run_dir, ckpt = distributed.run_on_main(open_run, weights_only=True)
        cfg = detect_config_from_dict(cfg_dict, source="run config")
        if progress is None:
            progress = cfg.progress
        if progress is None:
            progress = sys.stderr.isatty() and not os.environ.get("CI")
        run = DetectRun(cfg, Path(run_dir), ckpt, ctx, bar=progress, overwrite=overwrite)
        del ckpt
        run.run()
        return distributed.run_on_main(run.result)
