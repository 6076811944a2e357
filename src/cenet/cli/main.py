"""Entry point of the ``cenet`` command (``cenet = "cenet.cli.main:main"``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import cenet
from cenet.cli import analyze as analyze_cmd
from cenet.cli import bench as bench_cmd
from cenet.cli import compare as compare_cmd
from cenet.cli import detect as detect_cmd
from cenet.cli import eval as eval_cmd
from cenet.cli import export as export_cmd
from cenet.cli import info as info_cmd
from cenet.cli import listing
from cenet.cli import train as train_cmd


def build_parser() -> argparse.ArgumentParser:
    """The ``cenet`` argument parser with its sub-commands."""
    parser = argparse.ArgumentParser(
        prog="cenet",
        description=(
            "Channel Equilibrium Networks (Shao et al., ICML 2020): train, evaluate and "
            "analyze CIFAR-10 and ImageNet-style models."
        ),
        epilog="Run 'cenet COMMAND --help' for the options of a command.",
    )
    parser.add_argument(
        "--version", action="version", version=f"cenet {cenet.__version__}",
        help="print the installed cenet version and exit",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages as well")
    parser.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train_cmd.add_parser(sub)
    eval_cmd.add_parser(sub)
    analyze_cmd.add_parser(sub)
    compare_cmd.add_parser(sub)
    export_cmd.add_parser(sub)
    bench_cmd.add_parser(sub)
    detect_cmd.add_parser(sub)
    listing.add_parsers(sub)
    info_cmd.add_parser(sub)
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("cenet")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _rank_tag() -> str:
    """`` [rank R/W]`` under torchrun with several processes (each prints its own error)."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f" [rank {os.environ.get('RANK', '?')}/{world}]" if world not in ("", "1") else ""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cenet`` command with ``argv`` (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for a usage, config, data or checkpoint error (the
        message is printed to stderr), 130 when interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        print(f"cenet {args.command}{_rank_tag()}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cenet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
