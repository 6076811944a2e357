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


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1.

    Raises:
        argparse.ArgumentTypeError: naming the value, when it is not such an integer (argparse
            then exits with status 2 and the usage).
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (>= 1), got {value}")
    return value


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
    ("--threads", "threads", int, "N", "torch CPU threads (default: all cores)"),
    ("--device", "device", str, "DEV", "cpu (default), cuda or cuda:N"),
    ("--out", "out", str, "DIR", "run directory (default runs/<model>_s<seed>)"),
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
        settings.add_argument(flag, dest=key, type=typ, metavar=metavar,
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
    values.update({key: getattr(args, key) for _, key, *_ in _FLAGS if hasattr(args, key)})
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
