"""Speed and memory of BN+ReLU against BN+CE+ReLU (and the other blocks) on this machine.

Prints, per input shape (N, C, H, W): train forward+backward and eval forward time (ms, the
median over rounds in which the blocks take turns), the ratio of these medians to BN+ReLU
("x"), the median of the per-round ratios ("paired": the blocks of one round run within a
second of each other, so a slow phase of this shared machine hits both sides of a ratio), and
the memory autograd saves for backward (MiB, distinct storages, the block's input included).
The header names the CPU, its capability and the CE implementation timed: ``--isa`` forces the
native kernels of one instruction set (``generic``, ``avx2``, ``avx512``) or the pure-PyTorch
``reference``, and may be repeated to time several in one run; ``--compile`` times every block
under ``torch.compile`` as well (CE against compiled BN+ReLU).

    python benchmarks/bench_block.py [--threads 2] [--rounds 7] [--isa avx2 --isa avx512]
        [--compile] [--shape N C H W]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from cenet import kernels
from cenet.layers import ChannelEquilibrium
from cenet.train.allocator import keep_freed_memory

SHAPES = [(64, 64, 32, 32), (64, 256, 8, 8), (32, 256, 56, 56), (32, 1024, 14, 14)]


def blocks(c: int) -> dict[str, nn.Module]:
    """The blocks to compare for C channels, BN+ReLU first."""
    out = {
        "BN+ReLU": nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True)),
        "BN+CE+ReLU": nn.Sequential(
            nn.BatchNorm2d(c), ChannelEquilibrium(c), nn.ReLU(inplace=True)
        ),
    }
    try:
        from cenet.layers import SqueezeExcitation
    except ImportError:
        return out
    out["BN+ReLU+SE"] = nn.Sequential(
        nn.BatchNorm2d(c), nn.ReLU(inplace=True), SqueezeExcitation(c)
    )
    return out


def saved_bytes(block: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward (the block's
    input included, which BN saves)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x).sum()
    return sum(seen.values())


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time_ms(fn, number: int) -> float:
    _sync()
    start = time.perf_counter()
    for _ in range(number):
        fn()
    _sync()
    return (time.perf_counter() - start) / number * 1e3


def time_blocks(
    blocks_: dict[str, nn.Module], x: torch.Tensor, rounds: int, min_run_time: float
) -> dict[tuple[str, str], list[float]]:
    """Times in ms per (block, "train" or "eval") over ``rounds`` rounds that visit the blocks
    in turn.

    Interleaving the blocks within each round, rather than timing one block after the other,
    keeps slow phases of a shared machine from landing on one block only.
    """
    grad = torch.randn(x.shape, device=x.device)
    xe = x.detach()

    def train_step(block):
        return lambda: block(x).backward(grad)

    def eval_step(block):
        def run():
            with torch.inference_mode():
                block(xe)
        return run

    steps = {}
    for name, block in blocks_.items():
        for mode, make in (("train", train_step), ("eval", eval_step)):
            block.train(mode == "train")
            fn = make(block)
            fn()  # warm-up (and, once per machine, the kernel build)
            number = max(1, int(min_run_time / rounds / max(1e-4, _time_ms(fn, 1) / 1e3)))
            steps[name, mode] = (block, mode == "train", fn, number)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for _ in range(rounds):
        for key, (block, training, fn, number) in steps.items():
            block.train(training)
            times[key].append(_time_ms(fn, number))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--min-run-time", type=float, default=2.0,
                        help="seconds per block and mode, spread over the rounds")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median)")
    parser.add_argument("--fresh-memory", action="store_true",
                        help="do not keep freed memory (every large tensor is page-faulted anew)")
    parser.add_argument("--isa", action="append", choices=("reference", "generic", "avx2",
                                                           "avx512"),
                        help="CE implementation to time (repeatable; default: the one this "
                             "machine uses)")
    parser.add_argument("--device", default="cpu",
                        help="cpu or cuda (on a GPU the CE block runs the reference)")
    parser.add_argument("--compile", action="store_true",
                        help="also time every block under torch.compile")
    parser.add_argument("--shape", type=int, nargs=4, action="append", metavar=("N", "C", "H", "W"),
                        help="an input shape to time instead of the default four (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.fresh_memory:
        keep_freed_memory()
    info = kernels.info()
    for isa in args.isa or [kernels.active_isa() or "reference"]:
        native = None if isa == "reference" else isa
        for compiled in (False, True) if args.compile else (False,):
            with kernels.use_isa(native):
                device = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                          else f"{info['cpu']} (capability {info['cpu_capability']})")
                print(f"\n{device}, torch "
                      f"{torch.__version__}, {args.threads} threads, "
                      f"{'fresh' if args.fresh_memory else 'reused'} memory, CE: {isa}"
                      f"{', torch.compile' if compiled else ', eager'}, median of "
                      f"{args.rounds} interleaved rounds")
                run(args, compiled)


def run(args: argparse.Namespace, compiled: bool) -> None:
    """Print the table for the shapes of ``args`` with the implementation in force."""
    if compiled:
        # every block, shape and mode (train, eval under inference_mode) is its own graph
        torch._dynamo.config.recompile_limit = 64
    print(f"{'shape':>20} {'block':>12} {'train ms':>9} {'x':>5} {'paired':>6} {'eval ms':>8} "
          f"{'x':>5} {'paired':>6} {'saved MiB':>9} {'x':>5}")
    for shape in [tuple(s) for s in args.shape] if args.shape else SHAPES:
        x = torch.randn(*shape, device=args.device, requires_grad=True)
        blocks_ = {name: b.to(args.device) for name, b in blocks(shape[1]).items()}
        if compiled:
            torch._dynamo.reset()
            blocks_ = {name: torch.compile(block) for name, block in blocks_.items()}
        times = time_blocks(blocks_, x, args.rounds, args.min_run_time)
        first = next(iter(blocks_))
        base_mem = None
        for name, block in blocks_.items():
            block.train()
            mem = saved_bytes(block, x) / 2**20
            base_mem = base_mem or mem
            cells = []
            for mode in ("train", "eval"):
                runs, ref = times[name, mode], times[first, mode]
                med = statistics.median(runs)
                paired = statistics.median(t / t0 for t, t0 in zip(runs, ref, strict=True))
                width = 9 if mode == "train" else 8
                cells.append(f"{med:{width}.2f} {med / statistics.median(ref):5.2f} {paired:6.2f}")
            print(f"{str(shape):>20} {name:>12} {' '.join(cells)} {mem:9.1f} "
                  f"{mem / base_mem:5.2f}", flush=True)


if __name__ == "__main__":
    main()
