"""``cenet info``: the software and hardware the CE kernels run on."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``info`` sub-command to ``sub``."""
    p = sub.add_parser(
        "info",
        help="show versions, CPU, kernel ISA and threads (for bug reports)",
        description=(
            "Print what cenet.kernels.info() reports, one 'name: value' per line: torch and "
            "cenet versions, the CPU model and capability, the instruction sets the CE "
            "kernels support and the one in use, whether the kernels are active (or why "
            "their build failed), torch threads and CUDA devices."
        ),
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=run)


def format_value(value: Any) -> str:
    """One value of the report as text: sequences joined with ', ' ('none' when empty),
    mappings as 'key=value' pairs, None as 'none', booleans as 'yes'/'no'."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={format_value(v)}" for k, v in value.items()) or "none"
    if isinstance(value, list | tuple | set | frozenset):
        return ", ".join(format_value(v) for v in value) or "none"
    return str(value)


def format_report(report: Mapping[str, Any]) -> list[str]:
    """The lines ``cenet info`` prints: ``name: value`` in the report's order."""
    return [f"{key}: {format_value(value)}" for key, value in report.items()]


def run(args: argparse.Namespace) -> int:
    """Run ``cenet info``: print :func:`cenet.kernels.info`. Errors propagate to
    :func:`cenet.cli.main`."""
    from cenet import kernels  # imported here: only this command needs it

    report = kernels.info()
    if args.json:
        print(json.dumps(report, default=str))
        return 0
    for line in format_report(report):
        print(line)
    return 0
