"""Export every registered network: torch.export (unfused and fused) and ONNX (fused), each
checked against the eager eval output at two batch sizes through the dynamic batch.

    .venv/bin/python experiments/export_all.py [--models GLOB] [--image-size 32] [--no-onnx]

One line per model: the relative parity max |export − eager| / max |eager| of the unfused
.pt2 program, the fused one and the fused ONNX file (ONNX Runtime, CPU), all against the
unfused eager model (so the fused columns include the fold's round-off), the seconds each
export took and the ONNX file size; then a summary (max parity per format, total times,
failures). Weights as initialized, with the 1-D parameters and running buffers perturbed (see
:func:`perturbed`). Exits 1 if anything failed or exceeded the tolerances
(unfused pt2 1e-5; fused pt2 and ONNX 1e-4).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import cenet
from cenet.deploy import fuse
from cenet.deploy.export import (
    example_input,
    export_onnx,
    export_program,
    parity,
    randomize_eval_state,
)

PT2_TOL, FUSED_TOL = 1e-5, 1e-4
BATCHES = (1, 3)


def perturbed(name: str) -> torch.nn.Module:
    """The network in eval with its parameters and buffers off their initial values."""
    torch.manual_seed(0)  # the weights too: the same network every run
    return randomize_eval_state(cenet.create_model(name))


def worst(model: torch.nn.Module, artifact, image_size: int) -> float:
    return max(parity(model, artifact, example_input(model, image_size, b, seed=10 + b))
               for b in BATCHES)


def run_one(name: str, image_size: int, onnx: bool, tmp: Path) -> dict:
    model = perturbed(name)
    row: dict = {"name": name}
    t = time.perf_counter()
    program = export_program(model, image_size=image_size)
    row["t_pt2"] = time.perf_counter() - t
    row["pt2"] = worst(model, program, image_size)
    fused = fuse(model)
    t = time.perf_counter()
    program = export_program(fused, image_size=image_size)
    row["t_fused"] = time.perf_counter() - t
    row["fused"] = worst(model, program, image_size)
    if onnx:
        t = time.perf_counter()
        path = export_onnx(program, tmp / f"{name}.onnx")
        row["t_onnx"] = time.perf_counter() - t
        row["onnx"] = worst(model, path, image_size)
        row["mib"] = path.stat().st_size / 2**20
        path.unlink()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="*", help="glob over cenet.list_models()")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--no-onnx", action="store_true", help="torch.export only")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the checks run tiny batches, and more "
                             "threads only contend with other processes)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n for n in cenet.list_models(args.models) if not n.startswith("_")]
    print(f"torch {torch.__version__}, {len(names)} models, {args.image_size}x"
          f"{args.image_size}, parity at batch {BATCHES}, {torch.get_num_threads()} threads")
    print(f"{'model':26s} {'pt2':>8s} {'fused':>8s} {'onnx':>8s}   {'t_pt2':>6s} "
          f"{'t_fused':>7s} {'t_onnx':>6s} {'MiB':>6s}")
    rows, failed = [], []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            try:
                row = run_one(name, args.image_size, not args.no_onnx, Path(tmp))
            except Exception as err:  # noqa: BLE001 - report and go on with the others
                failed.append(name)
                print(f"{name:26s} FAILED {type(err).__name__}: {err}", flush=True)
                continue
            rows.append(row)
            onnx = (f"{row['onnx']:8.1e}", f"{row['t_onnx']:6.1f}", f"{row['mib']:6.1f}") \
                if "onnx" in row else ("-".rjust(8), "-".rjust(6), "-".rjust(6))
            print(f"{name:26s} {row['pt2']:8.1e} {row['fused']:8.1e} {onnx[0]}   "
                  f"{row['t_pt2']:6.1f} {row['t_fused']:7.1f} {onnx[1]} {onnx[2]}", flush=True)
    print(f"\n{len(rows)}/{len(names)} exported in {time.perf_counter() - start:.0f} s")
    over = []
    for key, tol in (("pt2", PT2_TOL), ("fused", FUSED_TOL), ("onnx", FUSED_TOL)):
        values = [(r[key], r["name"]) for r in rows if key in r]
        if not values:
            continue
        seconds = sum(r["t_" + key] for r in rows if key in r)
        top, where = max(values)
        over += [n for v, n in values if v > tol]
        print(f"{key:6s} max parity {top:.1e} ({where}), tolerance {tol:.0e}; "
              f"export time {seconds:.0f} s")
    if failed or over:
        print(f"failed: {failed or 'none'}; over tolerance: {over or 'none'}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
