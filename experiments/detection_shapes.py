"""Mask R-CNN with a CE-ResNet-18-FPN backbone against the BN baseline on synthetic shapes, on
this machine's CPU, for the same wall-clock budget each (the issue's "Measured" section).

    .venv/bin/python experiments/detection_shapes.py --out runs/detection_shapes
    .venv/bin/python experiments/detection_shapes.py --out runs/detection_shapes_quick --budget-s 30
    .venv/bin/python experiments/detection_shapes.py --out runs/x --epochs 3   # epochs, no budget

Data: :func:`cenet.detection.synthetic.make_synthetic_coco` (rectangles, ellipses, triangles on
noise; 400 train / 100 val images of 128 px by default, seed 0), written under ``OUT/data``.

Models: ``maskrcnn_resnet18_fpn_ce`` and ``maskrcnn_resnet18_fpn``, both with ``norm="train"``
(BN and CE with batch statistics, every parameter trained, the CE blocks' IR gates and θ
included: the paper's ``sync`` setting keeps those as an ImageNet checkpoint has them, which
from scratch would leave them random) and all five backbone stages trained, **from scratch:
no ImageNet backbone checkpoint**, so
the numbers say how the two train from random weights on this toy task, not what the
paper's COCO Table 5 measures (ImageNet-initialized backbones, 24 epochs on 8 GPUs).

Budget: each model first trains 5 iterations on an 8-image copy of the data (a calibration run
in ``OUT/calibration``, not counted) to measure its seconds per iteration; its run then gets
``budget / (s per iteration)`` iterations (``max_steps``), with the schedule spanning
the epochs they fill (warm-up over 100 iterations, x0.1 after 2/3 and 11/12 of them, as the
paper's 16 and 22 of 24) and one evaluation at the end. With ``--epochs`` both train that
many epochs instead. Training runs through :func:`cenet.detection.session.train_detector`
(the code of ``cenet detect train``); its final COCO evaluation (the same as ``cenet detect
eval`` on the run's ``last.pt``) gives the APs.

Writes ``OUT/detection_shapes.md`` (machine, settings, the table of box / mask AP, AP50, AP75
side by side) and ``OUT/detection_shapes.json``; prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cenet.deploy.bench_report import machine_header
from cenet.detection.coco_eval import BOX_METRICS
from cenet.detection.config import DetectConfig, load_detect_config
from cenet.detection.session import train_detector
from cenet.detection.synthetic import make_synthetic_coco
from cenet.train.runtime import resolve_threads

MODELS = ("maskrcnn_resnet18_fpn_ce", "maskrcnn_resnet18_fpn")
LABELS = {
    "maskrcnn_resnet18_fpn_ce": "CE-ResNet-18-FPN",
    "maskrcnn_resnet18_fpn": "ResNet-18-FPN (BN)",
}
WARMUP_ITERS = 100
CALIBRATION_STEPS = 5
HEADS = {
    # torchvision's defaults (512 RoIs per image, 2000 proposals, 100 detections) are sized for
    # COCO; 128-px images hold at most 4 shapes
    "box_batch_size_per_image": 128,
    "rpn_pre_nms_top_n_train": 1000,
    "rpn_post_nms_top_n_train": 500,
    "rpn_pre_nms_top_n_test": 500,
    "rpn_post_nms_top_n_test": 250,
    "box_detections_per_img": 20,
}

log = logging.getLogger("cenet.experiments.detection_shapes")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/detection_shapes"),
                   help="output folder (data, runs, report)")
    p.add_argument("--budget-s", type=float, default=600.0,
                   help="training seconds per model (default 600)")
    p.add_argument("--epochs", type=int, default=None,
                   help="train this many epochs each instead of a time budget")
    p.add_argument("--num-train", type=int, default=400)
    p.add_argument("--num-val", type=int, default=100)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--max-objects", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2, help="images per iteration")
    p.add_argument("--lr", type=float, default=0.005,
                   help="learning rate actually used (the config's lr is this x 16 / batch); "
                   "default 0.005, twice the paper's rate per image (0.02 / 16); in a short "
                   "test a CE model with its gates frozen diverged at 0.01")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    args = p.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be >= 1")
    if args.budget_s <= 0:
        p.error("--budget-s must be > 0")
    return args


def base_config(args: argparse.Namespace, model: str, data: Path, out: Path,
                **changes: Any) -> DetectConfig:
    values: dict[str, Any] = {
        "model": model, "data": str(data), "out": str(out), "norm": "train",
        "backbone_checkpoint": None, "trainable_backbone_layers": 5,
        "min_size": args.image_size, "max_size": args.image_size, "detector_kwargs": HEADS,
        "batch_size": args.batch_size, "lr": args.lr * 16 / args.batch_size,
        "warmup_iters": WARMUP_ITERS, "warmup_factor": 0.001, "workers": 0, "threads": args.threads,
        "seed": args.seed, "device": "cpu", "progress": False, "log_interval": 50,
        "checkpoint_every": 0,
    }  # fmt: skip
    values.update(changes)
    return load_detect_config(None, values)


def milestones(epochs: int) -> list[int]:
    """The paper's 16 and 22 of 24 epochs, scaled to ``epochs`` (those < 1 or repeated
    dropped)."""
    points = sorted({round(epochs * 16 / 24), round(epochs * 22 / 24)})
    return [m for m in points if 1 <= m]


def calibrate(args: argparse.Namespace, model: str, out: Path) -> float:
    """Seconds per training iteration of ``model`` (5 iterations on the first 8 images, the
    second of two such runs: the first pays for first-use costs, e.g. loading the CE kernels,
    which made the first model's budget ~1/3 short)."""
    data = make_synthetic_coco(out / "data", num_train=8, num_val=1, image_size=args.image_size,
                               max_objects=args.max_objects, seed=args.seed)
    cfg = base_config(args, model, data, out / model, epochs=1, max_steps=CALIBRATION_STEPS)
    train_detector(cfg, overwrite=True)
    result = train_detector(cfg, overwrite=True)
    return result.train_time_s / result.global_step


def plan(args: argparse.Namespace, seconds_per_iter: float, iters_per_epoch: int) -> dict:
    """Epochs, milestones and max_steps of a run (budget or ``--epochs``)."""
    if args.epochs is not None:
        epochs = args.epochs
        steps = None
    else:
        steps = max(1, int(args.budget_s / seconds_per_iter))
        epochs = math.ceil(steps / iters_per_epoch)
        if steps == epochs * iters_per_epoch:
            steps = None  # whole epochs: no early stop
    return {"epochs": epochs, "max_steps": steps, "milestones": milestones(epochs),
            "eval_every": epochs}


def run_model(args: argparse.Namespace, model: str, data: Path) -> dict[str, Any]:
    iters_per_epoch = math.ceil(args.num_train / args.batch_size)
    seconds = calibrate(args, model, args.out / "calibration")
    settings = plan(args, seconds, iters_per_epoch)
    log.info("%s: %.2f s per iteration -> %s", model, seconds, settings)
    cfg = base_config(args, model, data, args.out / "runs" / model, **settings)
    start = time.perf_counter()
    result = train_detector(cfg, overwrite=True)
    total = time.perf_counter() - start
    return {
        "model": model, "label": LABELS[model], "norm": cfg.norm,
        "calibration_s_per_iter": seconds, **settings, "iterations": result.global_step,
        "epochs_trained": result.global_step / iters_per_epoch, "lr": result.lr,
        "train_time_s": result.train_time_s, "run_time_s": total,
        "images_per_s": result.images_per_s, "run_dir": str(result.run_dir),
        "metrics": {k: {n: _none(v) for n, v in m.items()} for k, m in result.metrics.items()},
    }  # fmt: skip


def _none(value: float) -> float | None:
    return None if value is None or math.isnan(value) else value


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| backbone | iterations (epochs) | train min | img/s | box AP | AP50 | AP75 "
            "| mask AP | AP50 | AP75 |")
    lines = [head, "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        box, mask = r["metrics"].get("bbox", {}), r["metrics"].get("segm", {})
        aps = [_pct(box.get(k)) for k in BOX_METRICS[:3]] + [_pct(mask.get(k))
                                                              for k in BOX_METRICS[:3]]
        lines.append(
            f"| {r['label']} | {r['iterations']} ({r['epochs_trained']:.2f}) | "
            f"{r['train_time_s'] / 60:.1f} | {r['images_per_s']:.2f} | " + " | ".join(aps) + " |"
        )
    return "\n".join(lines)


def report(args: argparse.Namespace, header: dict, rows: list[dict], data_s: float) -> str:
    budget = (f"{args.epochs} epochs each" if args.epochs is not None
              else f"a training budget of {args.budget_s:.0f} s each")
    lines = [
        "# Mask R-CNN on synthetic shapes: CE-ResNet-18-FPN vs ResNet-18-FPN (BN)",
        "",
        f"Machine: {header['cpu']}, {header['threads']} torch thread(s), torch "
        f"{header['torch']}, {header['date']}, commit {header['commit']}.",
        f"Command: `{header['command']}`",
        "",
        f"Data: synthetic COCO layout, {args.num_train} train / {args.num_val} val images of "
        f"{args.image_size} px, 1-{args.max_objects} shapes each (3 categories), seed "
        f"{args.seed} ({data_s:.0f} s to write).",
        f"Training: {budget}; batch {args.batch_size}, SGD lr {args.lr:g} (momentum 0.9, "
        f"wd 1e-4), {WARMUP_ITERS} warm-up iterations, x0.1 at 2/3 and 11/12 of the "
        f"epochs; norm `train` (BN / CE with the statistics of each batch of "
        f"{args.batch_size} images, every parameter trained, CE gates and theta included); "
        f"all backbone stages trained; **from scratch, no "
        f"ImageNet backbone checkpoint** (the paper's Table 5 fine-tunes ImageNet backbones "
        f"on COCO). RoI heads sized for the toy task: {HEADS}.",
        "",
        "COCO AP (%) on the val images, at the end of training:",
        "",
        table(rows),
        "",
        "Seconds per iteration measured before each run (5 iterations): "
        + ", ".join(f"{r['label']} {r['calibration_s_per_iter']:.2f}" for r in rows) + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("cenet")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
    threads = resolve_threads(args.threads)
    args.threads = threads
    torch.set_num_threads(threads)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    header = machine_header(torch.device("cpu"), threads, command)
    print(f"machine: {header['cpu']} | {threads} torch thread(s) | torch {header['torch']} | "
          f"load {header['load_average_before']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = make_synthetic_coco(args.out / "data", num_train=args.num_train, num_val=args.num_val,
                               image_size=args.image_size, max_objects=args.max_objects,
                               seed=args.seed)
    data_s = time.perf_counter() - start
    rows = [run_model(args, model, data) for model in args.models]
    text = report(args, header, rows, data_s)
    (args.out / "detection_shapes.md").write_text(text, encoding="utf-8")
    payload = {"machine": header, "args": {k: str(v) if isinstance(v, Path) else v
                                           for k, v in vars(args).items()},
               "heads": HEADS, "results": rows}  # fmt: skip
    (args.out / "detection_shapes.json").write_text(json.dumps(payload, indent=2) + "\n",
                                                    encoding="utf-8")
    print(table(rows))
    print(f"written: {args.out / 'detection_shapes.md'}, {args.out / 'detection_shapes.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
