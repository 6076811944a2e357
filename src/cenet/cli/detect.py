"""``cenet detect``: train and evaluate Faster / Mask R-CNN with (CE-)ResNet-FPN backbones on
COCO-layout data (CE paper Sec. 5.3, Table 5).

    cenet detect train --model NAME --data COCO_ROOT [--config NAME|PATH] [options]
    cenet detect eval --checkpoint PATH --data COCO_ROOT [--split val2017] [--json FILE]
    cenet detect list [--configs]

``torchrun --nproc_per_node N -m cenet detect train ...`` trains data-parallel.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from cenet.cli.argtypes import non_negative_int, positive_int
from cenet.detection.config import (
    AMP_CHOICES,
    DIST_BACKENDS,
    SCHEMA,
    bundled_detect_configs,
    detect_config_from_dict,
    parse_detect_overrides,
    run_dir_of,
)
from cenet.train.distributed import env_rank

# cenet.detection.NORM_SETTINGS, spelled out so that --help stays fast (a test compares them)
_NORMS = ("frozen", "sync", "train")

# (flag, config key, type, metavar, help); each sets the config key of the same name when given
_FLAGS: tuple[tuple[str, str, Any, str, str], ...] = (
    ("--model", "model", str, "NAME", "detector name (see 'cenet detect list')"),
    ("--data", "data", str, "COCO_ROOT",
     "COCO 2017 root: annotations/instances_{train,val}2017.json, train2017/, val2017/"),
    ("--norm", "norm", str, "{" + ",".join(_NORMS) + "}",
     "backbone norms: frozen (statistics and affine fixed), sync (trained; SyncBatchNorm "
     "and SyncCE, the CE gate fixed; CUDA only with several processes) or train (every "
     "norm parameter trained, per-process statistics: from scratch)"),
    ("--backbone-checkpoint", "backbone_checkpoint", str, "PATH",
     "ImageNet weights of the backbone: a cenet train run directory or checkpoint, or a "
     "torchvision state dict (default: random initialization)"),
    ("--out", "out", str, "DIR", "run directory (default runs/detect_<model>_s<seed>)"),
    ("--epochs", "epochs", positive_int, "N", "number of epochs"),
    ("--batch-size", "batch_size", positive_int, "N",
     "images per process and iteration (the global batch is N x processes)"),
    ("--lr", "lr", float, "LR",
     "learning rate for a global batch of 16 images; the run uses LR x global batch / 16"),
    ("--min-size", "min_size", positive_int, "N", "shorter image side after resizing (px)"),
    ("--max-size", "max_size", positive_int, "N", "longer image side limit (px)"),
    ("--amp", "amp", str, "{" + ",".join(AMP_CHOICES) + "}",
     "mixed precision (torch.autocast; fp16 with a gradient scaler); default float32"),
    ("--workers", "workers", non_negative_int, "N", "data loading processes per process"),
    ("--threads", "threads", positive_int, "N",
     "torch CPU threads per process (default: the cores divided among the node's processes)"),
    ("--max-steps", "max_steps", positive_int, "N",
     "stop after N iterations in total, then evaluate and checkpoint (smoke runs)"),
    ("--seed", "seed", int, "N", "random seed (weights, data order, flips, sampling)"),
    ("--checkpoint-every", "checkpoint_every", non_negative_int, "N",
     "also write last.pt every N iterations (0: only at the end of every epoch)"),
    ("--device", "device", str, "DEV",
     "cpu (default), cuda or cuda:N; under torchrun each process takes cuda:LOCAL_RANK"),
    ("--dist-backend", "dist_backend", str, "NAME",
     "torch.distributed backend under torchrun (default: NCCL on CUDA, gloo on the CPU)"),
)

_CHOICES = {"norm": _NORMS, "amp": AMP_CHOICES, "dist_backend": DIST_BACKENDS}


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``detect`` sub-command (with ``train``, ``eval``, ``list``) to ``sub``."""
    p = sub.add_parser(
        "detect",
        help="train / evaluate Faster and Mask R-CNN with CE backbones on COCO",
        description=(
            "Object detection and instance segmentation with (CE-)ResNet-FPN backbones "
            "(CE paper Sec. 5.3, Table 5) on data in the COCO 2017 layout."
        ),
    )
    actions = p.add_subparsers(dest="detect_command", metavar="ACTION", required=True)
    _add_train(actions)
    _add_eval(actions)
    _add_list(actions)


def _add_train(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "train",
        help="train a detector (or resume a run)",
        description=(
            "Train a detector, or resume a run. Settings come from the DetectConfig defaults "
            "(the paper's schedule), then --config, then --set KEY=VALUE, then the options "
            "below (later wins). The run directory gets config.yaml, metrics.jsonl (one line "
            "per epoch), last.pt and, at the end, metrics.json with the box/mask APs."
        ),
        epilog=f"Config keys for --set: {', '.join(SCHEMA.keys())}. "
        f"Bundled configs: {', '.join(bundled_detect_configs())}.",
    )
    p.add_argument("-c", "--config", metavar="NAME_OR_PATH",
                   help="YAML config file, or a bundled config (see 'cenet detect list "
                   "--configs')")  # fmt: skip
    settings = p.add_argument_group("settings", "each sets the config key of the same name")
    for flag, key, typ, metavar, text in _FLAGS:
        settings.add_argument(flag, dest=key, type=typ, metavar=metavar, choices=_CHOICES.get(key),
                              default=argparse.SUPPRESS, help=text)  # fmt: skip
    settings.add_argument(
        "--skip-bad-images", dest="skip_bad_images", action=argparse.BooleanOptionalAction,
        default=argparse.SUPPRESS,
        help="skip and count unreadable images instead of stopping with an error",
    )  # fmt: skip
    p.add_argument(
        "--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
        help="set any config key; VALUE is read as YAML (repeatable), e.g. --set "
        "milestones=[8,11] --set detector_kwargs={box_detections_per_img: 50}",
    )  # fmt: skip
    p.add_argument(
        "--resume", nargs="?", const=True, default=None, metavar="PATH",
        help="continue the run in --out (or PATH: a run directory or checkpoint) from its "
        "last.pt, with the config stored in it",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run even if the run directory is not empty")  # fmt: skip
    p.add_argument(
        "--progress", dest="progress", action=argparse.BooleanOptionalAction, default=None,
        help="a progress bar (--progress) or an INFO line every log_interval iterations "
        "(--no-progress); default: a bar on a terminal when CI is unset",
    )  # fmt: skip
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML and exit")  # fmt: skip
    p.set_defaults(func=run_train)


def _add_eval(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "eval",
        help="COCO box (and mask) APs of a trained detector",
        description=(
            "Evaluate a 'cenet detect train' checkpoint with pycocotools: prints the box APs "
            "(and, for Mask R-CNN, the mask APs) in the CE paper's Table 5 columns (AP, AP50, "
            "AP75) and all six COCO APs (AP, AP50, AP75, APs, APm, APl), and writes them to "
            "JSON."
        ),
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a checkpoint file (last.pt) or run directory")  # fmt: skip
    p.add_argument("--data", required=True, metavar="COCO_ROOT", help="COCO 2017 root")
    p.add_argument("--split", default="val2017",
                   help="split to evaluate: annotations/instances_SPLIT.json and SPLIT/ "
                   "(default val2017)")  # fmt: skip
    p.add_argument("--json", metavar="FILE",
                   help="where to write the APs (default: eval_SPLIT.json beside the "
                   "checkpoint)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                   help="images per batch (default: the run's batch_size)")  # fmt: skip
    p.add_argument("--workers", type=non_negative_int, default=0, metavar="N",
                   help="data loading processes")  # fmt: skip
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="torch CPU threads")  # fmt: skip
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip and count unreadable images instead of stopping")  # fmt: skip
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False,
                   help="a progress bar over the batches")  # fmt: skip
    p.set_defaults(func=run_eval)


def _add_list(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser("list", help="list the detector names (or the bundled configs)",
                           description="Print the detector names for --model.")  # fmt: skip
    p.add_argument("--configs", action="store_true",
                   help="print the bundled detection configs (for --config) instead")  # fmt: skip
    p.set_defaults(func=run_list)


# ----------------------------------------------------------------------------- train


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The config values given on the command line: --config, then --set, then options."""
    values: dict[str, Any] = {}
    if args.config:
        values.update(SCHEMA.read_yaml(args.config))
    values.update(parse_detect_overrides(args.overrides))
    keys = [key for _, key, *_ in _FLAGS] + ["skip_bad_images"]
    values.update({key: getattr(args, key) for key in keys if hasattr(args, key)})
    return values


def _resume_path(args: argparse.Namespace, given: dict[str, Any]) -> Path:
    """The checkpoint ``--resume`` means: its PATH, else ``last.pt`` in ``--out`` or in the
    default run directory of the model and seed."""
    if args.resume is not True:
        return Path(args.resume)
    if given.get("out"):
        return Path(given["out"]) / "last.pt"
    keys = {k: given[k] for k in ("model", "seed") if k in given}
    return run_dir_of(detect_config_from_dict(keys)) / "last.pt"


def run_train(args: argparse.Namespace) -> int:
    """Run ``cenet detect train``; prints the summary on rank 0. Errors propagate to
    :func:`cenet.cli.main.main` (exit status 2)."""
    from cenet.detection.session import resume_detector, train_detector

    given = _given(args)
    if args.resume is not None and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if args.print_config and args.resume is None:
        print(SCHEMA.dump(detect_config_from_dict(given, source="--config/--set/options")),
              end="")  # fmt: skip
        return 0
    if args.resume is not None:
        if args.print_config:
            raise ValueError("--print-config shows a new run's config; a resumed run's is in "
                             "its config.yaml")  # fmt: skip
        result = resume_detector(_resume_path(args, given), given, progress=args.progress)
    else:
        cfg = detect_config_from_dict(given, source="--config/--set/options")
        result = train_detector(cfg, overwrite=args.overwrite, progress=args.progress)
    if env_rank() == 0:
        print(train_summary(result))
    return 0


def train_summary(result: Any) -> str:
    """The report printed at the end of ``cenet detect train`` (a
    :class:`cenet.detection.run_state.DetectResult`)."""
    from cenet.detection.coco_eval import format_table

    after = f"{result.epochs} epoch{'s' if result.epochs != 1 else ''}"
    if result.stopped_at_max_steps:
        after = f"{result.global_step} iterations (max_steps; {after} complete)"
    lines = [
        f"trained {after}, lr {result.lr:g}",
        format_table(result.metrics) if result.metrics else "no evaluation",
        f"training time: {result.wall_time_s / 60:.2f} min "
        f"({result.images_per_s:.2f} images/s in training)",
        f"run directory: {Path(result.run_dir)}",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- eval


def all_aps_table(metrics: dict[str, dict[str, float]]) -> str:
    """A Markdown table of the six COCO APs (percent) per IoU type (``box``, ``mask``)."""
    from cenet.detection.coco_eval import BOX_METRICS

    rows = ["| | " + " | ".join(BOX_METRICS) + " |", "|:---|" + "---:|" * len(BOX_METRICS)]
    for kind, values in metrics.items():
        cells = [_pct(values.get(name)) for name in BOX_METRICS]
        rows.append(f"| {'box' if kind == 'bbox' else 'mask'} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _pct(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _strict(metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    return {k: {n: (None if math.isnan(v) else v) for n, v in m.items()} for k, m in
            metrics.items()}  # fmt: skip


def run_eval(args: argparse.Namespace) -> int:
    """Run ``cenet detect eval``: print the APs (rank 0) and write them to JSON."""
    from cenet.detection.coco_eval import format_table
    from cenet.detection.evaluate import evaluate_checkpoint

    result, cfg = evaluate_checkpoint(
        args.checkpoint, args.data, split=args.split, device=args.device,
        batch_size=args.batch_size, workers=args.workers, threads=args.threads,
        skip_bad_images=args.skip_bad_images, progress=args.progress,
    )  # fmt: skip
    if env_rank() != 0:
        return 0
    ckpt = Path(args.checkpoint)
    out = Path(args.json) if args.json else (ckpt if ckpt.is_dir() else ckpt.parent) / (
        f"eval_{args.split}.json")  # fmt: skip
    report = {
        "checkpoint": str(ckpt),
        "model": cfg.model,
        "norm": cfg.norm,
        "data": str(args.data),
        "split": args.split,
        "num_images": result.num_images,
        "bad_images": result.bad_images,
        "num_detections": result.num_detections,
        "seconds": result.seconds,
        **_strict(result.metrics),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"{cfg.model} on {args.split} ({result.num_images} images"
          f"{f', {result.bad_images} unreadable skipped' if result.bad_images else ''}):")
    print(format_table(result.metrics, name=cfg.model))
    print()
    print(all_aps_table(result.metrics))
    print(f"written to {out}")
    return 0


# ----------------------------------------------------------------------------- list


def run_list(args: argparse.Namespace) -> int:
    """Print the detector names (or, with ``--configs``, the bundled configs)."""
    if args.configs:
        names = bundled_detect_configs()
    else:
        from cenet.detection import list_detectors

        names = list_detectors()
    for name in names:
        print(name)
    return 0
