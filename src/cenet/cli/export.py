"""``cenet export``: (being written)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``export`` sub-command to ``sub``."""
    p = sub.add_parser("export", help="(being written)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``cenet export``."""
    raise ValueError("cenet export is not written yet")
