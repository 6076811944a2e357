"""What SyncCE costs: bytes and time of each CE layer's all-reduce, and their share of a step.

    python benchmarks/bench_sync_ce.py [--model resnet50_ce] [--batch 4] [--size 224]
                                       [--nproc 2] [--repeats 5] [--backend gloo]

Starts ``--nproc`` processes on this machine (gloo over loopback, one thread each). For every
CE layer of the model it prints the statistics SyncCE all-reduces per training forward (one
float32 vector: count, Σx (G·g) and Σxxᵀ (G·g·g) of BD, count and Σσ̃² of IR), its size in
bytes and the median time of that all-reduce; the backward all-reduces a vector of the same
size once more. Then it times a DDP training step (forward, backward, SGD) of the model with
per-process CE (native operator where the kernels are loaded, and the reference path) and
with SyncCE (always the reference path, since the native operator computes per-process
statistics), so the cost of the all-reduces and their share in the step can be read off.
Nothing is asserted: the figures depend on the machine and its load. The header names the
CPU and its capability.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import cenet
from cenet import kernels
from cenet.layers import ChannelEquilibrium
from cenet.layers.sync_ce import all_reduce_sum


def ce_statistics_numel(layer: ChannelEquilibrium) -> int:
    """Elements of the vector one training forward of ``layer`` all-reduces under SyncCE."""
    numel = 0
    if layer.bd is not None:
        groups, g = layer.bd.num_groups, layer.bd.group_size
        numel += 1 + groups * g + groups * g * g
    if layer.ir is not None:
        numel += 2
    return numel


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _worker(rank: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(args.backend, rank=rank, world_size=args.nproc)
    try:
        _measure(rank, args)
    finally:
        dist.destroy_process_group()


def _measure(rank: int, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = cenet.create_model(args.model, num_classes=1000)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, ChannelEquilibrium)]
    if rank == 0:
        info = kernels.info()
        print(f"{info['cpu']} (capability {info['cpu_capability']}), torch {torch.__version__}, "
              f"{args.nproc} processes x 1 thread, backend {args.backend}, {args.model}, "
              f"batch {args.batch} per process, {args.size}x{args.size}, "
              f"median of {args.repeats}")
        print(f"\n{'CE layer':<28} {'C':>5} {'g':>3} {'floats':>7} {'bytes':>8} {'ms':>7}")
    total_ms = total_bytes = 0.0
    for name, layer in layers:
        numel = ce_statistics_numel(layer)
        vec = torch.randn(numel)
        ms = 1e3 * _median_time(lambda v=vec: all_reduce_sum([v], None), args.repeats * 4)
        total_ms += ms
        total_bytes += 4 * numel
        if rank == 0:
            g = layer.bd.group_size if layer.bd is not None else "-"
            print(f"{name:<28} {layer.num_features:>5} {g:>3} {numel:>7} {4 * numel:>8} "
                  f"{ms:>7.3f}")
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,))
    results = {}
    native = kernels.active_isa()
    runs = [("per-process CE", False, native), ("per-process ref", False, None),
            ("SyncCE", True, None)]
    for label, convert, isa in runs:
        torch.manual_seed(0)
        net = cenet.create_model(args.model, num_classes=1000).to(memory_format=torch.channels_last)
        if convert:
            net = cenet.convert_sync_ce(net)
        ddp = nn.parallel.DistributedDataParallel(net)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
        with kernels.use_isa(isa):
            _train_step(ddp, opt, x, y)  # warm-up
            results[label] = _median_time(
                lambda d=ddp, o=opt: _train_step(d, o, x, y), args.repeats)
    if rank == 0:
        per_step = 2 * total_ms  # one all-reduce in the forward, one in the backward
        step_ms = 1e3 * results["SyncCE"]
        print(f"\n{len(layers)} CE layers: {total_bytes / 1024:.1f} KiB all-reduced per "
              f"forward, {per_step:.1f} ms of all-reduces per step (forward + backward)")
        notes = {"per-process CE": f"CE native ({native})" if native else "CE reference",
                 "per-process ref": "CE reference path", "SyncCE": "reference path + all-reduces"}
        for label, seconds in results.items():
            print(f"DDP train step, {label:<16} {1e3 * seconds:9.1f} ms   {notes[label]}")
        ref = results["per-process ref"]
        print(f"SyncCE's all-reduces: {100 * per_step / step_ms:.1f} % of the SyncCE step; "
              f"SyncCE - reference {1e3 * (results['SyncCE'] - ref):+.1f} ms "
              f"({results['SyncCE'] / ref:.3f}x); SyncCE / native per-process CE "
              f"{results['SyncCE'] / results['per-process CE']:.3f}x (a synchronized forward "
              f"runs the reference: the native operator computes per-process statistics)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50_ce")
    parser.add_argument("--batch", type=int, default=4, help="images per process")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="gloo")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(args, port), nprocs=args.nproc, join=True)


if __name__ == "__main__":
    main()
