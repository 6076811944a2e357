"""``cenet bench``: (being written)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``bench`` sub-command to ``sub``."""
    p = sub.add_parser("bench", help="(being written)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``cenet bench``."""
    raise ValueError("cenet bench is not written yet")
