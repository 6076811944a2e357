"""Speed and memory of BN+ReLU against BN+CE+ReLU (and the other blocks) on this machine.

Prints, per input shape (N, C, H, W): train forward+backward and eval forward time (ms, median
of torch.utils.benchmark's blocked_autorange), the ratio to BN+ReLU, and the memory autograd
saves for backward (MiB, distinct storages, the block's input included).

    python benchmarks/bench_block.py [--threads 2] [--min-run-time 1.0]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.benchmark import Timer

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per timing")
    parser.add_argument("--fresh-memory", action="store_true",
                        help="do not keep freed memory (every large tensor is page-faulted anew)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.fresh_memory:
        keep_freed_memory()
    print(f"torch {torch.__version__}, {args.threads} threads, "
          f"{'fresh' if args.fresh_memory else 'reused'} memory")
    print(f"{'shape':>20} {'block':>12} {'train ms':>9} {'x':>5} {'eval ms':>8} {'x':>5} "
          f"{'saved MiB':>9} {'x':>5}")
    for shape in SHAPES:
        x = torch.randn(*shape, requires_grad=True)
        base = None
        for name, block in blocks(shape[1]).items():
            block.train()
            grad = torch.randn(shape)
            t_train = Timer(
                "block(x).backward(grad)", globals={"block": block, "x": x, "grad": grad},
                num_threads=args.threads,
            ).blocked_autorange(min_run_time=args.min_run_time).median * 1e3
            mem = saved_bytes(block, x) / 2**20
            block.eval()
            xe = x.detach()
            with torch.inference_mode():
                t_eval = Timer(
                    "block(x)", globals={"block": block, "x": xe}, num_threads=args.threads
                ).blocked_autorange(min_run_time=args.min_run_time).median * 1e3
            if base is None:
                base = (t_train, t_eval, mem)
            print(
                f"{str(shape):>20} {name:>12} {t_train:9.2f} {t_train / base[0]:5.2f} "
                f"{t_eval:8.2f} {t_eval / base[1]:5.2f} {mem:9.1f} {mem / base[2]:5.2f}"
            )


if __name__ == "__main__":
    main()
