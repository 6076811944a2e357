"""``cenet bench``: the CE paper's Table 1 on this machine: parameters, GMACs and eval latency
of the BN, SE, GCT and CE networks, eager, compiled, fused and in ONNX Runtime, each as a
ratio to the BN network (:mod:`cenet.deploy.bench`)."""

from __future__ import annotations

import argparse
import shlex
import sys

from cenet.cli.argtypes import non_negative_int, positive_int

DESCRIPTION = """\
Measure the CE paper's Table 1 on this machine. For each architecture (default: ResNet-18/50/101,
MobileNetV2, ShuffleNetV2 1.0x, each as BN, SE, GCT and CE where cenet registers it): parameters,
multiply-adds of the eval model and of its fused copy (torch.utils.flop_counter, MACs = FLOPs/2,
one image), and the median latency of an eval forward for each backend and batch size, each as
a ratio to the BN network of the same architecture with the same backend. Backends: eager (the
eval model), compile (torch.compile of it), fused (cenet.deploy.fuse), onnx (the fused model
exported to ONNX, run by ONNX Runtime). One backend after another, the networks of an
architecture take turns within each round; warm-up rounds are not timed. Prints the Markdown
table and writes table1.md and table1.json into --out; docs/benchmarks.md has this machine's."""


def _batch_sizes(text: str) -> tuple[int, ...]:
    from cenet.deploy.bench import parse_batch_sizes

    try:
        return parse_batch_sizes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _backends(text: str) -> tuple[str, ...]:
    from cenet.deploy.bench import parse_backends

    try:
        return parse_backends(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``bench`` sub-command to ``sub``."""
    p = sub.add_parser(
        "bench", help="Table 1 on this machine: params, GMACs, eval latency vs BN",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", nargs="+", metavar="NAME",
                   help="registered names or glob patterns (default: the BN/SE/GCT/CE variants "
                        "of resnet18, resnet50, resnet101, mobilenet_v2, shufflenet_v2_x1_0); "
                        "each variant's BN network is added as its reference")
    p.add_argument("--batch-size", type=_batch_sizes, default=(1, 32), metavar="N[,N...]",
                   help="comma-separated batch sizes (default: 1,32)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch and ONNX Runtime intra-op threads (default: torch's, the cores)")
    p.add_argument("--repeats", type=positive_int, default=7, help="timed rounds (default: 7)")
    p.add_argument("--warmup", type=non_negative_int, default=2,
                   help="untimed rounds before them (default: 2)")
    p.add_argument("--image-size", type=positive_int, default=224, metavar="S",
                   help="input S×S (default: 224)")
    p.add_argument("--backends", type=_backends, default=("eager", "compile", "fused", "onnx"),
                   metavar="B[,B...]", help="among eager, compile, fused, onnx (default: all)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="run the torch backends on channels-last maps (default; on a 2-core "
                        "Xeon it made ResNet-50 eval 5-18%% faster, BN and CE alike, see "
                        "docs/benchmarks.md); --no-channels-last: NCHW")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="keep the initial running statistics (default: fill them from one "
                        "random training-mode batch so activations keep their scale)")
    p.add_argument("--fresh-memory", dest="reuse_memory", action="store_false",
                   help="do not keep freed memory for reuse (default: keep it, as training "
                        "does, so large activations are not page-faulted anew in every forward)")
    p.add_argument("--profile", type=non_negative_int, nargs="?", const=12, default=0,
                   metavar="TOP",
                   help="also list the TOP operators by self CPU time (torch.profiler) of each "
                        "network's eager and fused forward at each batch size, after the "
                        "timing (default TOP: 12)")
    p.add_argument("--out", default="runs/bench", metavar="DIR",
                   help="directory for table1.md and table1.json (default: runs/bench)")
    p.set_defaults(func=run)


def command_line(args: argparse.Namespace) -> str:
    """The ``cenet bench`` command that repeats this run, every setting spelled out."""
    parts = ["cenet", "bench"]
    if args.models is not None:
        parts += ["--models", *args.models]
    parts += ["--batch-size", ",".join(map(str, args.batch_size)), "--device", args.device]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    parts += ["--repeats", str(args.repeats), "--warmup", str(args.warmup), "--image-size",
              str(args.image_size), "--backends", ",".join(args.backends),
              "--channels-last" if args.channels_last else "--no-channels-last"]
    if not args.calibrate:
        parts.append("--no-calibrate")
    if not args.reuse_memory:
        parts.append("--fresh-memory")
    if args.profile:
        parts += ["--profile", str(args.profile)]
    parts += ["--out", args.out]
    return " ".join(shlex.quote(p) for p in parts)


def run(args: argparse.Namespace) -> int:
    """Run ``cenet bench``; errors (unknown model, no CUDA, ...) propagate as ValueError."""
    from cenet.deploy.bench import BenchConfig, run_bench
    from cenet.deploy.bench_report import render_markdown, write_outputs

    command = command_line(args)
    config = BenchConfig(
        models=None if args.models is None else tuple(args.models),
        batch_sizes=tuple(args.batch_size), backends=tuple(args.backends), device=args.device,
        threads=args.threads, repeats=args.repeats, warmup=args.warmup,
        image_size=args.image_size, channels_last=args.channels_last,
        calibrate=args.calibrate, reuse_memory=args.reuse_memory,
        profile=args.profile, command=command,
    )
    result = run_bench(config)
    md_path, json_path = write_outputs(result, args.out)
    print(render_markdown(result), end="")
    print(f"\nwritten: {md_path}, {json_path}", file=sys.stderr)
    return 0
