"""``cenet train``: train a model from a config, with command-line overrides, or resume a run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cenet.cli.argtypes import ema_decay, non_negative_int, positive_int
from cenet.train import (
    SCHEDULES,
    TrainResult,
    config_from_dict,
    config_keys,
    load_checkpoint,
    parse_overrides,
    read_yaml_config,
    resume_config,
    resume_training,
    train,
)
from cenet.train.config import AMP_DTYPES, dump_yaml
from cenet.train.distributed import env_rank
from cenet.train.rundir import resume_checkpoint_path, run_dir_of

# (flag, config key, type, metavar, help); each sets the config key of the same name when given
_FLAGS: tuple[tuple[str, str, Any, str, str], ...] = (
    ("--model", "model", str, "NAME", "model name (see 'cenet models')"),
    ("--data", "data", str, "PATH",
     "CIFAR-10 archive or extracted folder, or an ImageFolder root with train/ and val/"),
    ("--dataset", "dataset", str, "KIND", "cifar10 (default) or folder (an ImageFolder tree)"),
    ("--image-size", "image_size", positive_int, "N",
     "input side in pixels, N x N for training and test. cifar10: only 32, its native "
     "size (the default). folder: training images get RandomResizedCrop(N) and a flip, "
     "test images Resize(N/0.875) and CenterCrop(N); default: the shorter side of the "
     "first training image"),
    ("--epochs", "epochs", int, "N", "number of epochs"),
    ("--batch-size", "batch_size", int, "N", "training batch size"),
    ("--lr", "lr", float, "LR", "peak learning rate (after warm-up)"),
    ("--weight-decay", "weight_decay", float, "WD", "SGD weight decay"),
    ("--schedule", "schedule", str, "NAME", f"LR schedule: {', '.join(SCHEDULES)}"),
    ("--warmup-epochs", "warmup_epochs", float, "E", "linear warm-up length in epochs"),
    ("--label-smoothing", "label_smoothing", float, "EPS", "label smoothing of the loss"),
    ("--seed", "seed", int, "N", "random seed (weights, dropout, data order and augmentation)"),
    ("--train-subset", "train_subset", int, "N", "train on N images only (class-balanced)"),
    ("--label-noise", "label_noise", float, "P",
     "fraction of training labels replaced at random, in [0, 1]"),
    ("--record-channels", "record_channels", int, "B",
     "after each epoch, record the inhibited ratio and channel correlation on B test batches"),
    ("--threads", "threads", int, "N",
     "torch CPU threads per process (default: the cores divided among the processes of "
     "the node)"),
    ("--device", "device", str, "DEV",
     "cpu (default), cuda or cuda:N; under torchrun each process takes cuda:LOCAL_RANK"),
    ("--out", "out", str, "DIR", "run directory (default runs/<model>_s<seed>)"),
    ("--workers", "num_workers", non_negative_int, "N",
     "data loading worker processes per training process (ImageFolder data)"),
    ("--grad-accum", "grad_accum_steps", positive_int, "N",
     "cut each process's batch into N micro-batches whose gradients are summed before the "
     "optimizer step (--batch-size stays the global batch)"),
    ("--amp", "amp", str, "{" + ",".join(AMP_DTYPES) + "}",
     "mixed precision (torch.autocast; fp16 with a gradient scaler); default float32"),
    ("--model-ema", "model_ema_decay", ema_decay, "DECAY",
     "keep and evaluate an exponential moving average of the weights, e.g. 0.9998"),
    ("--max-steps", "max_steps", positive_int, "N",
     "stop after N optimizer steps in total, then evaluate and checkpoint (smoke tests)"),
    ("--dist-backend", "dist_backend", str, "NAME",
     "torch.distributed backend under torchrun: gloo, nccl, mpi or xccl (default: NCCL on "
     "CUDA, gloo on the CPU)"),
)

# (flag, config key, help); each --flag sets the key to true and --no-flag to false
_SWITCHES: tuple[tuple[str, str, str], ...] = (
    ("--sync-ce", "sync_ce",
     "under torchrun, compute CE/BD/IR batch statistics over all processes"),
    ("--sync-bn", "sync_bn",
     "under torchrun, convert BatchNorm to SyncBatchNorm (CUDA only)"),
    ("--compile", "compile", "torch.compile the model (after DDP wrapping)"),
    ("--channels-last", "channels_last", "run the model in channels-last memory format"),
    ("--skip-bad-images", "skip_bad_images",
     "skip and count unreadable images instead of stopping with an error"),
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``train`` sub-command to ``sub``."""
    p = sub.add_parser(
        "train",
        help="train a model (or resume a run)",
        description=(
            "Train a model, or resume a run. Settings come from the TrainConfig defaults, "
            "then --config, then --set KEY=VALUE, then the settings options below (later "
            "wins). The run directory gets config.yaml, metrics.jsonl, last.pt and best.pt."
        ),
        epilog=f"Config keys for --set: {', '.join(config_keys())}.",
    )
    p.add_argument(
        "-c",
        "--config",
        metavar="NAME_OR_PATH",
        help="YAML config file, or the name of a bundled config (see 'cenet configs')",
    )
    settings = p.add_argument_group(
        "settings", "each sets the config key of the same name (--image-size: image_size)"
    )
    for flag, key, typ, metavar, text in _FLAGS:
        choices = AMP_DTYPES if key == "amp" else ("gloo", "nccl", "mpi", "xccl") if (
            key == "dist_backend"
        ) else None
        settings.add_argument(flag, dest=key, type=typ, metavar=metavar, choices=choices,
                              default=argparse.SUPPRESS, help=text)
    for flag, key, text in _SWITCHES:
        settings.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction,
                              default=argparse.SUPPRESS, help=text)
    p.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="set any config key; VALUE is read as YAML (repeatable), e.g. --set "
        "milestones=[60,120] --set model_kwargs={width: 0.5}",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="PATH",
        help="continue the run in --out (or PATH: a run directory or checkpoint file) from "
        "its last.pt, with the config stored in it",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run even if the run directory is not empty (replaces its run files)",
    )
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=None,
        help="no progress bar but an INFO line every log_interval iterations (the default "
        "off a terminal and when CI is set); only rank 0 reports",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as YAML and exit without training",
    )
    p.set_defaults(func=run)


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The config values given on the command line: --config, then --set, then flags."""
    values: dict[str, Any] = {}
    if args.config:
        values.update(read_yaml_config(args.config))
    values.update(parse_overrides(args.overrides))
    keys = [key for _, key, *_ in _FLAGS] + [key for _, key, _ in _SWITCHES]
    values.update({key: getattr(args, key) for key in keys if hasattr(args, key)})
    return values


def _resume_dir(given: dict[str, Any]) -> Path:
    """The run directory ``--resume`` without a path continues: ``--out``, or the default
    ``runs/<model>_s<seed>`` (only these keys are looked at: the others may be changes that
    are valid only together with the stored config)."""
    if given.get("out"):
        return Path(given["out"])
    return run_dir_of(config_from_dict({k: given[k] for k in ("model", "seed") if k in given}))


def run(args: argparse.Namespace) -> int:
    """Run ``cenet train``; prints the summary (on rank 0 only under ``torchrun``). Errors
    propagate to :func:`cenet.cli.main`.

    Under ``torchrun`` a resumed run's checkpoint is read by rank 0 alone (inside
    :func:`cenet.train.resume_training`), so the other processes need no access to it.
    """
    given = _given(args)
    if args.resume is not None and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if args.print_config:
        if args.resume is not None:
            where = None if args.resume is True else args.resume
            path = resume_checkpoint_path(where, config_from_dict(given))
            cfg = resume_config(load_checkpoint(path)["config"], given, path.parent)
        else:
            cfg = config_from_dict(given, source="--config/--set/options")
        print(dump_yaml(cfg), end="")
        return 0
    if args.resume is not None:
        where = _resume_dir(given) / "last.pt" if args.resume is True else args.resume
        result = resume_training(where, given, progress=args.progress)
    else:
        cfg = config_from_dict(given, source="--config/--set/options")
        result = train(cfg, overwrite=args.overwrite, progress=args.progress)
    if env_rank() == 0:
        print(summary(result))
    return 0


def summary(result: TrainResult) -> str:
    """The short report printed at the end of ``cenet train``."""
    best = f"{result.best_top1:.2f}%" if result.best_top1 >= 0 else "-"
    best_epoch = f" (epoch {result.best_epoch})" if result.best_epoch else ""
    after = f"{result.epochs} epoch{'s' if result.epochs != 1 else ''}"
    if result.stopped_at_max_steps:
        after = f"{result.global_step} steps (max_steps; {after} complete)"
    return "\n".join(
        [
            f"final test top-1: {result.final_top1:.2f}%  (top-5 {result.final_top5:.2f}%, "
            f"loss {result.final_test_loss:.4f}) after {after}",
            f"best test top-1:  {best}{best_epoch}",
            f"training time:    {result.wall_time_s / 60:.2f} min "
            f"({result.images_per_s:.0f} images/s in training)",
            f"run directory:    {Path(result.run_dir)}",
        ]
    )
