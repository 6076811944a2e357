"""``cenet models`` (alias ``list-models``) and ``cenet configs``: what can be trained."""

from __future__ import annotations

import argparse

from cenet.models import list_models
from cenet.train import bundled_configs


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the ``models`` and ``configs`` sub-commands to ``sub``."""
    p = sub.add_parser(
        "models",
        aliases=["list-models"],
        help="list the registered model names",
        description="Print the names of cenet.models.list_models(), one per line.",
    )
    p.add_argument("pattern", nargs="?", help="glob filter, e.g. 'cifar_*_ce'")
    p.set_defaults(func=run_models)
    p = sub.add_parser(
        "configs",
        help="list the bundled training configs",
        description="Print the names of the configs shipped in cenet/configs (for --config).",
    )
    p.set_defaults(func=run_configs)


def run_models(args: argparse.Namespace) -> int:
    """Print the model names (matching ``args.pattern``)."""
    for name in list_models(args.pattern):
        print(name)
    return 0


def run_configs(args: argparse.Namespace) -> int:
    """Print the bundled config names."""
    for name in bundled_configs():
        print(name)
    return 0
