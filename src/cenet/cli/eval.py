"""``cenet eval``: evaluate a checkpoint on the test set of its config's data set."""

from __future__ import annotations

import argparse
import json

from cenet.train import evaluate_checkpoint


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``eval`` sub-command to ``sub``."""
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint on the test set",
        description=(
            "Rebuild the model from the config stored in a checkpoint (loaded with "
            "weights_only=True), load its weights and report test loss, top-1, top-5 and "
            "images/s."
        ),
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="checkpoint file (last.pt, best.pt) or run directory (uses its last.pt)",
    )
    p.add_argument("--data", help="data path (default: the one stored in the checkpoint)")
    p.add_argument("--batch-size", type=int, help="evaluation batch size")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: the stored one)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the stored ones)")
    p.add_argument("--ema", action="store_true",
                   help="evaluate the EMA weights of a run trained with --model-ema")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``cenet eval`` and print the result. Errors propagate to :func:`cenet.cli.main`."""
    result, meta = evaluate_checkpoint(
        args.checkpoint,
        data=args.data,
        batch_size=args.batch_size,
        device=args.device,
        threads=args.threads,
        weights="ema" if args.ema else "model",
    )
    cfg = meta["config"]
    if args.json:
        out = {
            "checkpoint": str(args.checkpoint),
            "model": cfg["model"],
            "weights": "ema" if args.ema else "model",
            "dataset": cfg["dataset"],
            "epoch": meta["epoch"],
            "global_step": meta["global_step"],
            **result.to_dict(),
        }
        print(json.dumps(out))
        return 0
    ema = ", EMA weights" if args.ema else ""
    print(f"checkpoint: {args.checkpoint} ({cfg['model']}{ema}, epoch {meta['epoch']})")
    print(
        f"test loss {result.loss:.4f}  top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  "
        f"({result.num_samples} images, {result.images_per_s:.0f} images/s)"
    )
    return 0
