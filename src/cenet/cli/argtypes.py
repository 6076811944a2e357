"""argparse value types shared by the sub-commands; each raises
``argparse.ArgumentTypeError`` naming the value (argparse then exits with status 2 and the usage).
"""

from __future__ import annotations

import argparse


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what} (>= {minimum}), got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def ema_decay(text: str) -> float:
    """argparse type: a number in (0, 1), the decay of the weights' moving average."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a decay in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a decay in (0, 1) such as 0.9998, got {value}"
        )
    return value
