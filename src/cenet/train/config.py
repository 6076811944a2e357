"""The training configuration: :class:`TrainConfig`, loaded from YAML plus overrides.

Precedence, lowest first: the dataclass defaults, the YAML file (``--config``), the
``key=value`` overrides (``--set``), then the named command-line options. Every key is checked
against the fields of :class:`TrainConfig`: an unknown key raises ``ValueError`` naming the close
matches and listing the valid keys.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cenet.train.config_files import ConfigSchema
from cenet.train.config_files import dump_yaml as dump_yaml  # re-exported

SCHEDULES = ("step", "multistep", "cosine", "poly", "constant")
"""Valid values of :attr:`TrainConfig.schedule`."""

GCT_NO_WD = ("beta", "all", "none")
"""Valid values of :attr:`TrainConfig.gct_no_wd`."""

AMP_DTYPES = ("bf16", "fp16")
"""Valid values of :attr:`TrainConfig.amp` (besides ``None``)."""

_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as ``config.yaml`` and in each checkpoint.

    Epoch-valued settings (``step_size``, ``milestones``, ``warmup_epochs``) count from the start
    of training, warm-up included, and are converted to iterations (the schedule is stepped once
    per iteration). Accuracies are percentages.

    Attributes:
        model: a name from :func:`cenet.models.list_models`.
        model_kwargs: keyword arguments of the model builder (e.g. ``{"width": 0.5}``).
        num_classes: classifier size; ``None`` = the data set's number of classes.
        dataset: data set name passed to :func:`cenet.data.build_loaders` (``"cifar10"``).
        data: path of the data (archive, extracted folder or ImageFolder root); ``None`` = the
            data module looks in its default places.
        image_size: input side N in pixels, train and test (``--image-size``); ``None`` =
            the data set's own. CIFAR-10: ``None`` or 32 only. ``"folder"``: training images
            get ``RandomResizedCrop(N)`` and a flip, test images ``Resize(N / 0.875)`` and
            ``CenterCrop(N)``; ``None`` = the shorter side of the first training image.
        batch_size: the global training batch: images per optimizer step summed over all
            processes and accumulation steps; each process loads ``batch_size / world_size``
            images per step and splits them into ``grad_accum_steps`` micro-batches.
        grad_accum_steps: micro-batches whose gradients are summed before each optimizer step,
            so fewer devices keep a recipe's global batch; must divide the per-process batch.
            Micro-batch ``a`` of a process is its images ``a::grad_accum_steps``, so runs
            with equal ``processes x grad_accum_steps`` see the same micro-batches.
        eval_batch_size: test batch size; ``None`` = ``batch_size``.
        epochs: number of passes over the training set.
        lr: peak learning rate (after warm-up).
        momentum: SGD momentum.
        nesterov: Nesterov momentum.
        weight_decay: L2 penalty of SGD.
        no_wd_1d: exclude every parameter with ``ndim <= 1`` (norm / CE weights, biases,
            scalars such as CE's ``theta``) from weight decay.
        gct_no_wd: GCT parameters without weight decay: ``"beta"`` (the GCT paper's advice),
            ``"all"`` (α, γ, β) or ``"none"``; no effect on networks without GCT.
        schedule: one of :data:`SCHEDULES`.
        step_size: ``"step"``: decay by ``gamma`` every ``step_size`` epochs.
        milestones: ``"multistep"``: epochs at which the LR is multiplied by ``gamma``.
        gamma: decay factor of ``"step"`` and ``"multistep"``.
        poly_power: exponent of ``"poly"`` (LR reaches 0 at the end of training).
        min_lr: final LR of ``"cosine"``.
        warmup_epochs: linear warm-up length in epochs (fractions allowed); 0 = none.
        warmup_start_factor: LR multiplier at the first warm-up iteration, in (0, 1].
        label_smoothing: of :class:`torch.nn.CrossEntropyLoss`, in [0, 1).
        seed: seed of the weights' initialisation, dropout and of the data order/augmentation.
        threads: ``torch.set_num_threads`` of each process; ``None`` = ``os.cpu_count()``
            divided by the processes on the node (``LOCAL_WORLD_SIZE`` under ``torchrun``).
        deterministic: call ``torch.use_deterministic_algorithms(True)``.
        keep_freed_memory: keep freed activation memory in the process (glibc ``mallopt``,
            see :mod:`cenet.train.allocator`); changes speed only, never results.
        channels_last: run the model and inputs in ``torch.channels_last`` memory format.
        train_subset: use only this many training images (``None`` = all).
        label_noise: fraction of training labels replaced at random, in [0, 1].
        num_workers: data loading worker processes.
        download: let the data module download a missing data set.
        record_channels: if > 0, after every evaluated epoch measure the inhibited-channel
            ratio and the channel correlation of the rectified outputs on this many test
            batches and add them to ``metrics.jsonl`` (CE paper Figs. 4d, 5).
        eval_every: evaluate on the test set every this many epochs (and after the last one).
        checkpoint_every_steps: also write ``last.pt`` every this many iterations; 0 = only at
            the end of each epoch.
        out: run directory; ``None`` = ``runs/<model>_s<seed>``.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. Under ``torchrun`` with CUDA each
            process uses ``cuda:LOCAL_RANK``.
        log_interval: iterations between progress-bar updates (and progress lines when the
            output is not a terminal).
        amp: mixed precision: ``"bf16"`` or ``"fp16"`` (``torch.autocast`` around forward and
            loss; fp16 with a ``torch.amp.GradScaler`` on every device, the CPU included),
            ``None`` = float32. CE statistics and the Newton iteration stay float32; weights,
            optimizer and evaluation are float32.
        compile: ``torch.compile`` the model for training (after DDP wrapping, as the
            PyTorch DDP docs advise, so that DDPOptimizer splits graphs at bucket boundaries;
            the issue proposed compiling first); evaluation runs the module eagerly.
        model_ema_decay: keep an exponential moving average of the weights and buffers with
            this decay in (0, 1) and evaluate it beside the model; ``None`` = no EMA.
        sync_ce: in distributed training, synchronize CE/BD/IR batch statistics across
            processes (:func:`cenet.convert_sync_ce`).
        sync_bn: in distributed training, convert BatchNorm to ``torch.nn.SyncBatchNorm``;
            CUDA only (torch's SyncBatchNorm refuses CPU modules in DDP: a ValueError at
            start-up suggests ``sync_ce``). Both are no-ops for a single process.
        dist_backend: ``torch.distributed`` backend; ``None`` = NCCL on CUDA, gloo on CPU.
        skip_bad_images: skip (and count in the log) images that cannot be read or decoded;
            ``False`` = stop with an error naming the file.
        max_steps: stop after this many optimizer steps in total (the schedule still spans
            ``epochs``), evaluate and checkpoint; for smoke tests of a recipe. ``None`` = off.
            A stop within an epoch writes a ``metrics.jsonl`` record with ``"partial": true``
            and its ``step``; a resumed run continues to ``max_steps`` (which may change).
    """

    model: str = "cifar_resnet20_ce"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    dataset: str = "cifar10"
    data: str | None = None
    image_size: int | None = None
    batch_size: int = 256
    eval_batch_size: int | None = None
    epochs: int = 10
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    no_wd_1d: bool = False
    gct_no_wd: str = "beta"
    schedule: str = "cosine"
    step_size: float = 30.0
    milestones: list[float] = field(default_factory=list)
    gamma: float = 0.1
    poly_power: float = 1.0
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.1
    label_smoothing: float = 0.0
    seed: int = 0
    threads: int | None = None
    deterministic: bool = False
    keep_freed_memory: bool = True
    channels_last: bool = False
    train_subset: int | None = None
    label_noise: float = 0.0
    num_workers: int = 0
    download: bool = True
    eval_every: int = 1
    record_channels: int = 0
    checkpoint_every_steps: int = 0
    out: str | None = None
    device: str = "cpu"
    log_interval: int = 20
    grad_accum_steps: int = 1
    amp: str | None = None
    compile: bool = False
    model_ema_decay: float | None = None
    sync_ce: bool = False
    sync_bn: bool = False
    dist_backend: str | None = None
    skip_bad_images: bool = False
    max_steps: int | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), _HINTS[f.name]))
        self.validate()

    def validate(self) -> None:
        """Check every value.

        Raises:
            ValueError: naming the offending key, its value and what is valid.
        """
        _check(bool(self.model), "model", self.model, "a non-empty model name")
        _check(bool(self.dataset), "dataset", self.dataset, "a non-empty data set name")
        _positive_or_none(self, "num_classes", "image_size", "eval_batch_size", "train_subset")
        _positive_or_none(self, "threads")
        _check(
            self.dataset != "cifar10" or self.image_size in (None, 32),
            "image_size",
            self.image_size,
            "null or 32 with dataset=cifar10 (its images are 32x32; dataset=folder "
            "resizes an ImageFolder tree to any size)",
        )
        _check(self.batch_size > 0, "batch_size", self.batch_size, "an integer > 0")
        _check(self.epochs > 0, "epochs", self.epochs, "an integer > 0")
        _check(_finite(self.lr) and self.lr > 0, "lr", self.lr, "a number > 0")
        _check(0 <= self.momentum < 1, "momentum", self.momentum, "a number in [0, 1)")
        _check(
            not self.nesterov or self.momentum > 0,
            "nesterov",
            self.nesterov,
            "false when momentum is 0 (Nesterov needs momentum > 0)",
        )
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        _check(self.schedule in SCHEDULES, "schedule", self.schedule, f"one of {SCHEDULES}")
        _check(self.gct_no_wd in GCT_NO_WD, "gct_no_wd", self.gct_no_wd, f"one of {GCT_NO_WD}")
        _check(self.step_size > 0, "step_size", self.step_size, "a number of epochs > 0")
        _check(
            all(m > 0 for m in self.milestones) and self.milestones == sorted(self.milestones),
            "milestones",
            self.milestones,
            "an increasing list of epochs > 0",
        )
        _check(0 < self.gamma <= 1, "gamma", self.gamma, "a number in (0, 1]")
        _check(self.poly_power > 0, "poly_power", self.poly_power, "a number > 0")
        _check(0 <= self.min_lr < self.lr, "min_lr", self.min_lr, f"a number in [0, lr={self.lr})")
        _check(
            0 <= self.warmup_epochs < self.epochs,
            "warmup_epochs",
            self.warmup_epochs,
            f"a number of epochs in [0, epochs={self.epochs})",
        )
        _check(
            0 < self.warmup_start_factor <= 1,
            "warmup_start_factor",
            self.warmup_start_factor,
            "a number in (0, 1]",
        )
        _check(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing, "in [0, 1)")
        _check(0 <= self.label_noise <= 1, "label_noise", self.label_noise, "in [0, 1]")
        _check(self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0")
        _check(self.eval_every >= 1, "eval_every", self.eval_every, "an integer >= 1")
        _check(
            self.record_channels >= 0, "record_channels", self.record_channels,
            "an integer >= 0 (test batches; 0 = off)",
        )
        _check(
            self.checkpoint_every_steps >= 0,
            "checkpoint_every_steps",
            self.checkpoint_every_steps,
            "an integer >= 0 (0 = only at the end of each epoch)",
        )
        _check(
            bool(_DEVICE_RE.match(self.device)), "device", self.device, "'cpu', 'cuda' or 'cuda:N'"
        )
        _check(self.log_interval >= 1, "log_interval", self.log_interval, "an integer >= 1")
        _check(
            self.grad_accum_steps >= 1, "grad_accum_steps", self.grad_accum_steps,
            "an integer >= 1",
        )
        _check(
            self.batch_size % self.grad_accum_steps == 0,
            "batch_size",
            self.batch_size,
            f"a multiple of grad_accum_steps={self.grad_accum_steps}",
        )
        _check(self.amp is None or self.amp in AMP_DTYPES, "amp", self.amp,
               f"null or one of {AMP_DTYPES}")
        _check(
            self.model_ema_decay is None or 0 < self.model_ema_decay < 1,
            "model_ema_decay",
            self.model_ema_decay,
            "null or a number in (0, 1), e.g. 0.9998",
        )
        _check(
            self.dist_backend is None or self.dist_backend in ("gloo", "nccl", "mpi", "xccl"),
            "dist_backend",
            self.dist_backend,
            "null (NCCL on CUDA, gloo on CPU), 'gloo', 'nccl', 'mpi' or 'xccl'",
        )
        _positive_or_none(self, "max_steps")
        _check(
            all(isinstance(k, str) for k in self.model_kwargs),
            "model_kwargs",
            self.model_kwargs,
            "a mapping of argument names to values",
        )

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (str, numbers, bools, None, lists, dicts) of all fields."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with ``changes`` applied.

        Raises:
            ValueError: for an unknown key or an invalid value.
        """
        return config_from_dict({**self.to_dict(), **changes})


_HINTS = typing.get_type_hints(TrainConfig)


SCHEMA: ConfigSchema[TrainConfig] = ConfigSchema(TrainConfig, "cenet", "config")
"""Key checks, bundled configs (``cenet/configs/``), loading and dumping of :class:`TrainConfig`
(:class:`cenet.train.config_files.ConfigSchema`); the functions below are its methods."""

config_keys = SCHEMA.keys
check_keys = SCHEMA.check_keys
config_from_dict = SCHEMA.from_dict
bundled_configs = SCHEMA.bundled
resolve_config_path = SCHEMA.resolve
read_yaml_config = SCHEMA.read_yaml
parse_overrides = SCHEMA.parse_overrides
load_config = SCHEMA.load


# ----------------------------------------------------------------------------- value checks


def _check(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise ValueError(f"invalid {key}={value!r}: must be {valid}")


def _positive_or_none(cfg: TrainConfig, *keys: str) -> None:
    for key in keys:
        value = getattr(cfg, key)
        _check(value is None or value > 0, key, value, "an integer > 0 or null")


def _finite(x: float) -> bool:
    return math.isfinite(x)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert ``value`` to the field type ``hint`` where lossless (YAML reads ``5e-4`` as a
    string and ``1`` as an int); raise ValueError otherwise."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = (a for a in args if a is not type(None))
        return _coerce(key, value, inner)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ValueError(f"invalid {key}={value!r}: must be a list")
        return [_coerce(key, v, args[0]) for v in value]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"invalid {key}={value!r}: must be a mapping")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"invalid {key}={value!r}: must be true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"invalid {key}={value!r}: must be an integer")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"invalid {key}={value!r}: must be a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"invalid {key}={value!r}: must be a string")
    return value
