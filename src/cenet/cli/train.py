"""``cenet train``: train a model from a config, with command-line overrides, or resume a run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cenet.train import (
    SCHEDULES,
    TrainResult,
    config_from_dict,
    config_keys,
    load_checkpoint,
    parse_overrides,
    read_yaml_config,
    resume_config,
    train,
)
from cenet.train.config import dump_yaml
from cenet.train.rundir import resume_checkpoint_path

# (flag, config key, type, help); each sets the config key when given
_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--model", "model", str, "model name (see 'cenet models')"),
    ("--data", "data", str, "data path: CIFAR-10 archive, extracted folder or ImageFolder root"),
    ("--dataset", "dataset", str, "data set kind: cifar10 or folder"),
    ("--epochs", "epochs", int, "number of epochs"),
    ("--batch-size", "batch_size", int, "training batch size"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--weight-decay", "weight_decay", float, "SGD weight decay"),
    ("--schedule", "schedule", str, f"LR schedule: {', '.join(SCHEDULES)}"),
    ("--warmup-epochs", "warmup_epochs", float, "linear warm-up length in epochs"),
    ("--label-smoothing", "label_smoothing", float, "label smoothing of the loss"),
    ("--seed", "seed", int, "random seed (weights, dropout, data order and augmentation)"),
    ("--train-subset", "train_subset", int, "train on this many images only"),
    ("--label-noise", "label_noise", float, "fraction of training labels randomised"),
    ("--record-channels", "record_channels", int,
     "each epoch, record inhibited ratio and channel correlation on this many test batches"),
    ("--threads", "threads", int, "torch CPU threads (default: all cores)"),
    ("--device", "device", str, "cpu, cuda or cuda:N"),
    ("--out", "out", str, "run directory (default runs/<model>_s<seed>)"),
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``train`` sub-command to ``sub``."""
    p = sub.add_parser(
        "train",
        help="train a model (or resume a run)",
        description=(
            "Train a model. Settings come from the TrainConfig defaults, then --config, then "
            "--set key=value, then the named options (later wins). The run directory gets "
            "config.yaml, metrics.jsonl, last.pt and best.pt."
        ),
        epilog=f"Config keys for --set: {', '.join(config_keys())}.",
    )
    p.add_argument(
        "--config",
        "-c",
        metavar="NAME_OR_PATH",
        help="YAML config file, or the name of a bundled config (see 'cenet configs')",
    )
    for flag, key, typ, text in _FLAGS:
        p.add_argument(flag, dest=key, type=typ, default=argparse.SUPPRESS, help=text)
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
        help="no progress bar (default: shown on a terminal unless CI is set)",
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
    values.update({key: getattr(args, key) for _, key, _, _ in _FLAGS if hasattr(args, key)})
    return values


def run(args: argparse.Namespace) -> int:
    """Run ``cenet train``; prints the summary. Errors propagate to :func:`cenet.cli.main`."""
    given = _given(args)
    if args.resume is not None:
        if args.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        where = None if args.resume is True else args.resume
        path = resume_checkpoint_path(where, config_from_dict(given))
        cfg = resume_config(load_checkpoint(path)["config"], given, path.parent)
    else:
        path = None
        cfg = config_from_dict(given, source="--config/--set/options")
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    result = train(cfg, resume_from=path, overwrite=args.overwrite, progress=args.progress)
    print(summary(result))
    return 0


def summary(result: TrainResult) -> str:
    """The short report printed at the end of ``cenet train``."""
    best = f"{result.best_top1:.2f}%" if result.best_top1 >= 0 else "-"
    best_epoch = f" (epoch {result.best_epoch})" if result.best_epoch else ""
    return "\n".join(
        [
            f"final test top-1: {result.final_top1:.2f}%  (top-5 {result.final_top5:.2f}%, "
            f"loss {result.final_test_loss:.4f}) after {result.epochs} epoch"
            f"{'s' if result.epochs != 1 else ''}",
            f"best test top-1:  {best}{best_epoch}",
            f"training time:    {result.wall_time_s / 60:.2f} min "
            f"({result.images_per_s:.0f} images/s in training)",
            f"run directory:    {Path(result.run_dir)}",
        ]
    )
