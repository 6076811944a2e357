"""The detection training configuration: :class:`DetectConfig`, loaded from YAML plus overrides.

Precedence, lowest first: the dataclass defaults, the YAML file (``--config``: a path or the
name of a config bundled in ``cenet/detection/configs``), the ``key=value`` overrides
(``--set``), then the named command-line options. Every key is checked against the fields of
:class:`DetectConfig`: an unknown key raises ``ValueError`` naming the close matches and
listing the valid keys. Value conversion and checks are those of the classification config
(:mod:`cenet.train.config`).

Learning rate: ``lr`` is the rate of the *reference global batch* of
:data:`LR_REFERENCE_BATCH` = 16 images (the paper's 2 images per GPU x 8 GPUs). A run with a
global batch of ``B = batch_size x processes`` images trains with ``lr x B / 16`` (the linear
scaling rule, :func:`scaled_lr`), which the run logs.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cenet.train.config import _DEVICE_RE, AMP_DTYPES, _check, _coerce
from cenet.train.config_files import ConfigSchema, resume_config_of

LR_REFERENCE_BATCH = 16
"""The global batch (images per optimizer step) that :attr:`DetectConfig.lr` is given for."""

AMP_CHOICES = ("none", *AMP_DTYPES)
"""Values accepted for :attr:`DetectConfig.amp` (``"none"`` is stored as ``None``)."""

DIST_BACKENDS = ("gloo", "nccl", "mpi", "xccl")
"""Valid values of :attr:`DetectConfig.dist_backend` (besides ``None``)."""

RESUME_MUTABLE = frozenset(
    {
        "data",
        "out",
        "workers",
        "threads",
        "device",
        "dist_backend",
        "skip_bad_images",
        "max_steps",
        "checkpoint_every",
        "eval_every",
        "progress",
        "log_interval",
        "backbone_checkpoint",
    }
)
"""Keys that may differ from the checkpoint's config on resume: where the data and run are,
how fast and how often things happen, and ``max_steps`` (so a smoke run can be continued).
``backbone_checkpoint`` only initializes a new run (a resumed run loads every weight from its
checkpoint), so it may change (or move) too. Every other key must stay as it was."""


@dataclass(frozen=True)
class DetectConfig:
    """Everything a detection training run depends on; saved as ``config.yaml`` and in every
    checkpoint.

    Attributes:
        model: a detector name of :func:`cenet.detection.list_detectors`, e.g.
            ``"maskrcnn_resnet50_fpn_ce"``.
        data: root of a COCO 2017 layout (``annotations/instances_{train,val}2017.json``,
            ``train2017/``, ``val2017/``); required to train.
        out: run directory; ``None`` = ``runs/detect_<model>_s<seed>``.
        num_classes: classes of the box predictor, background included (category ids
            ``1..num_classes-1``); ``None`` = the data's largest category id + 1 (91 for COCO).
        norm: normalization of the backbone: ``"frozen"`` (BN and CE statistics and affine
            parameters frozen, as in torchvision and MMDetection) or ``"sync"`` (trainable,
            statistics over all processes: ``SyncBatchNorm`` / SyncCE, the CE gate and λ
            fixed; CUDA only with several processes) or ``"train"`` (beyond the paper: every
            norm parameter trained with per-process batch statistics, for a backbone trained
            from scratch). See :data:`cenet.detection.NORM_SETTINGS`.
        backbone_checkpoint: ImageNet-trained classification weights for the backbone (a
            ``cenet train`` checkpoint or a state dict); ``None`` = random initialization.
        trainable_backbone_layers: ResNet stages (counted from the last) that train, 0..5.
        min_size: shorter image side after resizing, in pixels (torchvision's transform).
        max_size: longer image side limit after resizing, in pixels (>= ``min_size``).
        detector_kwargs: further keywords of torchvision's ``FasterRCNN``/``MaskRCNN``
            constructor (e.g. ``{box_detections_per_img: 100}``).
        epochs: passes over the training set.
        batch_size: images per process and iteration (the paper: 2 per GPU); the global batch
            is ``batch_size x processes``.
        lr: SGD learning rate for a global batch of :data:`LR_REFERENCE_BATCH` (16) images;
            the run uses ``lr x global batch / 16`` (linear scaling), logged at start.
        momentum: SGD momentum, in [0, 1).
        weight_decay: SGD L2 penalty, >= 0.
        milestones: epochs (from 1, counted from the start) after which the learning rate is
            multiplied by ``gamma``; milestones beyond ``epochs`` are never reached.
        gamma: decay factor, in (0, 1].
        warmup_iters: iterations of linear warm-up (0 = none); the warm-up factor multiplies
            the step schedule (MMDetection's ``warmup='linear'``).
        warmup_factor: learning-rate factor at the first iteration, in (0, 1].
        amp: mixed precision: ``None`` (float32), ``"bf16"`` or ``"fp16"`` (``torch.autocast``
            around the forward and losses; fp16 with a ``torch.amp.GradScaler``). The YAML
            value ``none`` means ``None``.
        workers: data loading processes per training process (0 = load in the process).
        threads: ``torch.set_num_threads`` of each process; ``None`` = the cores divided among
            the processes of the node.
        seed: seed of the weight initialization, of the data order and augmentation and of the
            detector's sampling.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (under torchrun with CUDA each process
            uses ``cuda:LOCAL_RANK``).
        dist_backend: ``torch.distributed`` backend; ``None`` = NCCL on CUDA, gloo on the CPU.
        skip_bad_images: skip (and count in the log) images that are listed but missing or
            unreadable; ``False`` = stop with an error naming the file.
        max_steps: stop after this many iterations in total (the schedule still spans
            ``epochs``), evaluate and checkpoint; for smoke runs. ``None`` = off.
        checkpoint_every: also write ``last.pt`` every this many iterations (0 = only at the
            end of every epoch, which always happens).
        eval_every: evaluate on ``val2017`` every this many epochs (and after the last one).
        progress: a tqdm bar (true) or INFO lines every ``log_interval`` iterations (false);
            ``None`` = a bar on a terminal when ``CI`` is unset.
        log_interval: iterations between progress lines (and loss reductions for the log).
    """

    model: str = "maskrcnn_resnet50_fpn_ce"
    data: str | None = None
    out: str | None = None
    num_classes: int | None = None
    norm: str = "frozen"
    backbone_checkpoint: str | None = None
    trainable_backbone_layers: int = 3
    min_size: int = 800
    max_size: int = 1333
    detector_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 24
    batch_size: int = 2
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: tuple[int, ...] = (16, 22)
    gamma: float = 0.1
    warmup_iters: int = 500
    warmup_factor: float = 0.001
    amp: str | None = None
    workers: int = 2
    threads: int | None = None
    seed: int = 0
    device: str = "cpu"
    dist_backend: str | None = None
    skip_bad_images: bool = False
    max_steps: int | None = None
    checkpoint_every: int = 1000
    eval_every: int = 1
    progress: bool | None = None
    log_interval: int = 20

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "amp" and isinstance(value, str) and value.lower() == "none":
                value = None
            if f.name == "milestones":
                value = tuple(_coerce(f.name, value, list[int]))
            else:
                value = _coerce(f.name, value, _HINTS[f.name])
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Check every value.

        Raises:
            ValueError: naming the offending key, its value and what is valid.
        """
        from cenet.detection import NORM_SETTINGS  # the builders' own list

        _check(bool(self.model), "model", self.model, "a non-empty detector name")
        _check(self.data is None or bool(self.data), "data", self.data, "a path or null")
        _check(
            self.num_classes is None or self.num_classes >= 2,
            "num_classes",
            self.num_classes,
            "null (from the data) or an integer >= 2 (background + categories)",
        )
        _check(self.norm in NORM_SETTINGS, "norm", self.norm, f"one of {NORM_SETTINGS}")
        _check(
            0 <= self.trainable_backbone_layers <= 5,
            "trainable_backbone_layers",
            self.trainable_backbone_layers,
            "an integer in 0..5",
        )
        _check(self.min_size > 0, "min_size", self.min_size, "a number of pixels > 0")
        _check(
            self.max_size >= self.min_size,
            "max_size",
            self.max_size,
            f"a number of pixels >= min_size={self.min_size}",
        )
        _check(
            all(isinstance(k, str) for k in self.detector_kwargs),
            "detector_kwargs",
            self.detector_kwargs,
            "a mapping of FasterRCNN/MaskRCNN keyword names to values",
        )
        clash = sorted({"min_size", "max_size", "num_classes"} & set(self.detector_kwargs))
        _check(
            not clash,
            "detector_kwargs",
            self.detector_kwargs,
            f"free of {clash} (set them as config keys of their own)",
        )
        _check(self.epochs > 0, "epochs", self.epochs, "an integer > 0")
        _check(self.batch_size > 0, "batch_size", self.batch_size, "an integer > 0 (per process)")
        _check(self.lr > 0 and self.lr < float("inf"), "lr", self.lr, "a finite number > 0")
        _check(0 <= self.momentum < 1, "momentum", self.momentum, "a number in [0, 1)")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        _check(
            all(m > 0 for m in self.milestones)
            and list(self.milestones) == sorted(set(self.milestones)),
            "milestones",
            list(self.milestones),
            "a strictly increasing list of epochs > 0, e.g. [16, 22]",
        )
        _check(0 < self.gamma <= 1, "gamma", self.gamma, "a number in (0, 1]")
        _check(self.warmup_iters >= 0, "warmup_iters", self.warmup_iters, "an integer >= 0")
        _check(
            0 < self.warmup_factor <= 1, "warmup_factor", self.warmup_factor, "a number in (0, 1]"
        )
        _check(self.amp is None or self.amp in AMP_DTYPES, "amp", self.amp,
               f"one of {AMP_CHOICES}")  # fmt: skip
        _check(self.workers >= 0, "workers", self.workers, "an integer >= 0")
        _check(
            self.threads is None or self.threads > 0, "threads", self.threads,
            "an integer > 0 or null",
        )  # fmt: skip
        _check(bool(_DEVICE_RE.match(self.device)), "device", self.device,
               "'cpu', 'cuda' or 'cuda:N'")  # fmt: skip
        _check(
            self.dist_backend is None or self.dist_backend in DIST_BACKENDS,
            "dist_backend",
            self.dist_backend,
            f"null (NCCL on CUDA, gloo on the CPU) or one of {DIST_BACKENDS}",
        )
        _check(
            self.max_steps is None or self.max_steps > 0, "max_steps", self.max_steps,
            "an integer > 0 or null",
        )  # fmt: skip
        _check(
            self.checkpoint_every >= 0,
            "checkpoint_every",
            self.checkpoint_every,
            "an integer >= 0 (iterations; 0 = only at the end of each epoch)",
        )
        _check(self.eval_every >= 1, "eval_every", self.eval_every, "an integer >= 1 (epochs)")
        _check(self.log_interval >= 1, "log_interval", self.log_interval, "an integer >= 1")

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (str, numbers, bools, None, lists, dicts) of all fields."""
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    def replace(self, **changes: Any) -> DetectConfig:
        """A validated copy with ``changes`` applied.

        Raises:
            ValueError: for an unknown key or an invalid value.
        """
        return detect_config_from_dict({**self.to_dict(), **changes})


_HINTS = typing.get_type_hints(DetectConfig)


SCHEMA: ConfigSchema[DetectConfig] = ConfigSchema(
    DetectConfig, "cenet.detection", "detection config"
)
"""Key checks, bundled configs (``cenet/detection/configs/``), loading and dumping of
:class:`DetectConfig` (:class:`cenet.train.config_files.ConfigSchema`, as the classification
config's: ``SCHEMA.keys()``, ``SCHEMA.read_yaml(path)``, ``SCHEMA.dump(cfg)`` ...). The most
used methods have names of their own below."""

detect_config_from_dict = SCHEMA.from_dict
bundled_detect_configs = SCHEMA.bundled
parse_detect_overrides = SCHEMA.parse_overrides
load_detect_config = SCHEMA.load


def run_dir_of(cfg: DetectConfig) -> Path:
    """``cfg.out``, or ``runs/detect_<model>_s<seed>`` when it is null."""
    return Path(cfg.out) if cfg.out else Path("runs") / f"detect_{cfg.model}_s{cfg.seed}"


def scaled_lr(cfg: DetectConfig, world_size: int) -> float:
    """The learning rate actually used: ``lr x batch_size x world_size / 16`` (linear scaling
    from the reference global batch :data:`LR_REFERENCE_BATCH`)."""
    return cfg.lr * cfg.batch_size * world_size / LR_REFERENCE_BATCH


def resume_detect_config(
    stored: Mapping[str, Any], overrides: Mapping[str, Any], run_dir: str | os.PathLike[str]
) -> DetectConfig:
    """The config of a resumed run: the checkpoint's, with the ``overrides`` given again, and
    ``out`` set to ``run_dir`` (a run continues in the folder of its checkpoint).

    Raises:
        ValueError: if an override changes a key outside :data:`RESUME_MUTABLE` (the model,
            schedule, batch ... are the checkpoint's: start a new run to change them), names
            another ``out`` than ``run_dir``, or is invalid.
    """
    return resume_config_of(SCHEMA, stored, overrides, run_dir, mutable=RESUME_MUTABLE)
