"""``cenet export``: write a network as a ``torch.export`` program (``.pt2``) or an ONNX file,
then check the file against the eager model on random batches."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from torch import nn

import cenet
from cenet.cli.argtypes import positive_int
from cenet.deploy import export as ex
from cenet.deploy import fuse
from cenet.models import create_model

FORMATS = ("onnx", "pt2")
CHECK_BATCHES = (1, 3)
"""Batch sizes checked, besides the traced one, when the batch is dynamic."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``export`` sub-command to ``sub``."""
    p = sub.add_parser(
        "export",
        help="export a network to ONNX or a torch.export program (.pt2) and check it",
        description=(
            "Export a registered network (untrained) or a checkpoint's network in eval mode, "
            "with a dynamic batch dimension and the CE kernels off (standard operators only: "
            "the .pt2 loads with plain torch, the ONNX file runs in any ONNX runtime), then "
            "load the file and compare its output with the eager model's on random batches. "
            "Runs on the CPU. ONNX needs: pip install 'cenet[export]'."
        ),
    )
    src = p.add_argument_group("network (one of --model, --checkpoint, or both if they agree)")
    src.add_argument("--model", metavar="NAME", help="a registered network (cenet models)")
    src.add_argument("--checkpoint", metavar="PATH",
                     help="checkpoint file or run directory (uses its last.pt); the network "
                          "is rebuilt from the stored config")
    src.add_argument("--ema", action="store_true",
                     help="export the checkpoint's EMA weights (runs with --model-ema)")
    src.add_argument("--num-classes", type=positive_int, metavar="N",
                     help="classifier size of a --model (default: the builder's, 10 for "
                          "cifar_* and 1000 for the others)")
    p.add_argument("--format", choices=FORMATS,
                   help="output format (default: from the --out suffix, .onnx or .pt2)")
    p.add_argument("--out", required=True, metavar="FILE", help="file to write")
    p.add_argument("--fuse", action="store_true",
                   help="fold BN/BD/IterNorm/DBN into the convolutions first (cenet.deploy.fuse)")
    p.add_argument("--image-size", type=positive_int, metavar="N",
                   help="input side N (NxN); default: the checkpoint config's image_size, "
                        "else 32 for cifar_* networks and 224 for the others")
    p.add_argument("--batch-size", type=positive_int, default=2, metavar="B",
                   help="batch traced (default 2; >= 2 unless --static-batch)")
    p.add_argument("--static-batch", action="store_true",
                   help="fix the batch to --batch-size instead of a dynamic batch dimension")
    p.add_argument("--tolerance", type=float, default=1e-4, metavar="TOL",
                   help="largest accepted max|export - eager| / max|eager| (default 1e-4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random check batches")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=run)


def output_format(fmt: str | None, out: str) -> str:
    """``fmt``, or the format the suffix of ``out`` names.

    Raises:
        ValueError: if neither says, or the suffix names the other format.
    """
    suffix = Path(out).suffix.lower().lstrip(".")
    if fmt is None:
        if suffix not in FORMATS:
            raise ValueError(f"cannot tell the format from --out {out}: give --format "
                             f"{' or '.join(FORMATS)}, or end the file name in .onnx or .pt2")
        return suffix
    if suffix in FORMATS and suffix != fmt:
        raise ValueError(f"--format {fmt} but --out {out} ends in .{suffix}; "
                         f"name the file .{fmt} or pass --format {suffix}")
    return fmt


def model_from_checkpoint(
    path: str, *, weights: str = "model", expect: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The network of a checkpoint, rebuilt from its stored config (no data loaders), with
    its weights (``"model"`` or ``"ema"``), in eval mode on the CPU.

    Returns:
        ``(model, stored config dict)``.

    Raises:
        FileNotFoundError: if the checkpoint does not exist.
        ValueError: (``CheckpointError``) if it is not a cenet checkpoint, holds no EMA for
            ``"ema"``, names another model than ``expect``, or its weights do not fit.
    """
    from cenet.train.checkpoint import CheckpointError, load_checkpoint
    from cenet.train.evaluate import checkpoint_weights

    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    name = cfg.get("model")
    if not isinstance(name, str):
        raise CheckpointError(f"{path}: the stored config names no model")
    if expect is not None and expect != name:
        raise CheckpointError(f"{path} holds a {name!r} network (its config), not {expect!r}; "
                              f"drop --model or pass --model {name}")
    kwargs = cfg.get("model_kwargs") or {}
    try:
        model = create_model(name, num_classes=cfg.get("num_classes"), **kwargs)
    except TypeError as err:
        raise CheckpointError(f"{path}: model {name!r} rejects the stored model_kwargs "
                              f"{kwargs!r}: {err}") from None
    try:
        model.load_state_dict(checkpoint_weights(ckpt, weights))
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        detail = detail if len(detail) <= 300 else detail[:300] + " ..."
        raise CheckpointError(f"{path}: weights do not fit model {name!r}: {detail}") from None
    return model.eval(), cfg


def _source(args: argparse.Namespace) -> tuple[nn.Module, str, int, dict[str, Any]]:
    """The network, its name, its default image size and metadata for the file."""
    if args.checkpoint is None:
        if args.model is None:
            raise ValueError("give --model NAME (an untrained registered network) or "
                             "--checkpoint PATH")
        if args.ema:
            raise ValueError("--ema needs --checkpoint")
        model = create_model(args.model, num_classes=args.num_classes).eval()
        return model, args.model, _default_size(args.model, None), {"weights": "untrained"}
    if args.num_classes is not None:
        raise ValueError("--num-classes applies to --model alone; a checkpoint's classifier "
                         "size comes from its config")
    weights = "ema" if args.ema else "model"
    model, cfg = model_from_checkpoint(args.checkpoint, weights=weights, expect=args.model)
    meta = {"checkpoint": str(args.checkpoint), "weights": weights}
    return model, cfg["model"], _default_size(cfg["model"], cfg), meta


def _default_size(name: str, cfg: dict[str, Any] | None) -> int:
    if cfg and cfg.get("image_size"):
        return int(cfg["image_size"])
    if name.startswith("cifar_") or (cfg or {}).get("dataset") == "cifar10":
        return 32
    return 224


def _write(fmt: str, model: nn.Module, out: str, size: int, batch: int, dynamic: bool,
           meta: dict[str, Any]) -> None:
    program = ex.export_program(model, image_size=size, batch_size=batch, dynamic_batch=dynamic)
    if fmt == "pt2":
        ex.save_program(program, out, metadata=json.dumps(meta))
    else:
        ex.export_onnx(program, out, metadata={k: str(v) for k, v in meta.items()})


def run(args: argparse.Namespace) -> int:
    """Run ``cenet export`` and print the result. Errors propagate to :func:`cenet.cli.main`
    as ValueError or FileNotFoundError (a missing ONNX package too)."""
    fmt = output_format(args.format, args.out)
    if not args.tolerance > 0:
        raise ValueError(f"--tolerance must be > 0, got {args.tolerance}")
    if fmt == "onnx":
        try:
            ex.require_onnx()
        except ImportError as err:
            raise ValueError(str(err)) from None
    ex.check_output_path(args.out)  # fail before the slow part
    model, name, size, meta = _source(args)
    size = args.image_size or size
    dynamic = not args.static_batch
    ex.check_exportable(model)
    target = fuse(model) if args.fuse else model
    meta = {"model": name, **meta, "fused": args.fuse, "image_size": size,
            "dynamic_batch": dynamic, "cenet": cenet.__version__}
    start = time.perf_counter()
    _write(fmt, target, args.out, size, args.batch_size, dynamic, meta)
    seconds = time.perf_counter() - start
    artifact = ex.onnx_session(args.out) if fmt == "onnx" else ex.load_program(args.out)
    batches = (args.batch_size, *(b for b in CHECK_BATCHES if b != args.batch_size)) \
        if dynamic else (args.batch_size,)
    checks = {}
    for b in batches:
        x = ex.example_input(model, size, b, seed=args.seed + b)
        checks[b] = ex.parity(model, artifact, x)
    nbytes = Path(args.out).stat().st_size
    worst = max(checks.values())
    result = {
        "out": str(args.out), "format": fmt, "bytes": nbytes, "mib": nbytes / 2**20,
        "model": name, "fused": args.fuse,
        "folded": len(getattr(target, "folded", ())) if args.fuse else 0,
        "image_size": size, "dynamic_batch": dynamic, "seconds": seconds,
        "parity": {str(b): v for b, v in checks.items()}, "tolerance": args.tolerance,
        "ok": worst <= args.tolerance, **{k: v for k, v in meta.items() if k in
                                           ("checkpoint", "weights")},
    }
    _report(result, args.json)
    if worst > args.tolerance:
        raise ValueError(f"parity check failed: max|export - eager| / max|eager| = "
                         f"{worst:.2e} > --tolerance {args.tolerance:g}; {args.out} is kept "
                         f"for inspection")
    return 0


def _report(r: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(r))
        return
    fused = f"fused ({r['folded']} maps folded)" if r["fused"] else "not fused"
    batch = "B" if r["dynamic_batch"] else next(iter(r["parity"]))
    weights = f"weights of {r['checkpoint']}" if "checkpoint" in r else "untrained weights"
    if r.get("weights") == "ema":
        weights = "EMA " + weights
    print(f"wrote {r['out']} ({r['mib']:.2f} MiB, {r['format']}) in {r['seconds']:.1f} s")
    print(f"  {r['model']}, {weights}, {fused}, "
          f"{'dynamic batch' if r['dynamic_batch'] else 'static batch'}, "
          f"input ({batch}, 3, {r['image_size']}, {r['image_size']})")
    checks = ", ".join(f"{v:.1e} at batch {b}" for b, v in r["parity"].items())
    print(f"  parity max|{r['format']} - eager| / max|eager|: {checks} "
          f"({'ok' if r['ok'] else 'FAILED'}, tolerance {r['tolerance']:g})")
