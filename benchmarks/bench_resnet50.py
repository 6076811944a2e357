"""Train-step and eval-forward time of ResNet-50 plain / SE / CE on this CPU, side by side.

    python benchmarks/bench_resnet50.py [--batch 8] [--size 224] [--repeats 7] [--warmup 2]
                                        [--threads N] [--channels-last] [--models ...]
                                        [--isa reference|generic|avx2|avx512]

A train step is forward + cross-entropy + backward + SGD step (momentum 0.9, weight decay
1e-4) in training mode; eval is a forward in eval mode under ``torch.inference_mode``. Each
repeat times every network once, in turn, so that a change of load on a shared machine hits
all of them alike; the table gives the median and the fastest of the repeats, in seconds,
each with its ratio to plain ResNet-50, and the median over rounds of the ratio within a round
("paired": the networks of one round run within seconds of each other, so a slow phase of a
shared machine, which lasts longer, scales them alike). The fastest run is another estimate
of the cost (contention only ever adds time); the median shows how noisy the run was.
The project's targets: CE ≤ 1.15× plain per training step, ≤ 1.10× in eval; SE for
comparison. The paper's CPU inference times (batch 32, Xeon E5-2682 v4, Table 1)
are R50 8.61 / 11.08 / 11.06 s: SE and CE 1.29× and 1.28× plain.

Nothing here is asserted: speed is machine- and load-dependent, so it is printed, never
tested. Freed memory is kept in the process (``cenet.train.allocator.keep_freed_memory``, as
the training loop does) unless ``--fresh-memory``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

import cenet
from cenet import kernels
from cenet.train.allocator import keep_freed_memory


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor) -> float:
    """Seconds for one forward + backward + SGD step."""
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return time.perf_counter() - start


def eval_forward(model: nn.Module, x: torch.Tensor) -> float:
    """Seconds for one forward in eval mode."""
    start = time.perf_counter()
    with torch.inference_mode():
        model(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "resnet50_se", "resnet50_ce"],
                        help="registered names, the first is the reference")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per network")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per network")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--isa", choices=("reference", "generic", "avx2", "avx512"),
                        help="CE implementation (default: the one this machine uses)")
    parser.add_argument("--fresh-memory", action="store_true",
                        help="do not keep freed memory (every large tensor is page-faulted anew)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    isa = args.isa or kernels.active_isa() or "reference"
    with kernels.use_isa(None if isa == "reference" else isa):
        run(args, isa)


def run(args: argparse.Namespace, isa: str) -> None:
    """Time the networks of ``args`` with the CE implementation ``isa`` in force."""
    if not args.fresh_memory:
        keep_freed_memory()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (args.batch,))
    models = {n: cenet.create_model(n).to(memory_format=fmt) for n in args.models}
    opts = {n: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
            for n, m in models.items()}

    times: dict[str, dict[str, list[float]]] = {n: {"train": [], "eval": []} for n in models}
    for phase in ("train", "eval"):
        for r in range(args.warmup + args.repeats):
            # every other round in reverse order: no network always runs right after another
            order = list(models.items())
            for name, model in order if r % 2 else order[::-1]:
                model.train(phase == "train")
                if phase == "train":
                    t = train_step(model, opts[name], x, y)
                else:
                    t = eval_forward(model, x)
                if r >= args.warmup:
                    times[name][phase].append(t)

    info = kernels.info()
    print(f"{info['cpu']} (capability {info['cpu_capability']}), CE: {isa}")
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, "
          f"{args.size}×{args.size}, {'channels-last' if args.channels_last else 'NCHW'}, "
          f"median of {args.repeats} (after {args.warmup} warm-up), load average "
          f"{os.getloadavg()[0]:.2f}")
    head = (f"{'model':14} {'train s':>8} {'× plain':>8} {'min s':>7} {'× plain':>8} "
            f"{'paired':>7} {'eval s':>8} {'× plain':>8} {'min s':>7} {'× plain':>8} "
            f"{'paired':>7}")
    print(head)
    print("-" * len(head))
    ref = times[args.models[0]]
    for name in models:
        cells = []
        for phase in ("train", "eval"):
            runs = times[name][phase]
            med, best = statistics.median(runs), min(runs)
            paired = statistics.median(t / t0 for t, t0 in zip(runs, ref[phase], strict=True))
            cells.append(f"{med:8.3f} {med / statistics.median(ref[phase]):8.2f} "
                         f"{best:7.3f} {best / min(ref[phase]):8.2f} {paired:7.2f}")
        print(f"{name:14} {' '.join(cells)}")

if __name__ == "__main__":
    main()
