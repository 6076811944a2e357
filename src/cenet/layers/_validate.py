"""Argument checks shared by the layers (raised in ``__init__``, never in ``forward``)."""

from __future__ import annotations

from torch import Tensor


def check_positive_int(name: str, value: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an int ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_group_size(num_features: int, group_size: int) -> None:
    """Raise ``ValueError`` unless ``group_size`` is positive and divides ``num_features``."""
    check_positive_int("num_features", num_features)
    check_positive_int("group_size", group_size)
    if num_features % group_size:
        valid = [d for d in range(1, num_features + 1) if num_features % d == 0]
        raise ValueError(
            f"group_size={group_size} does not divide num_features={num_features}; "
            f"valid group sizes are the divisors {valid}"
        )


def check_unit_interval(name: str, value: float, *, closed: bool = True) -> None:
    """Raise ``ValueError`` unless 0 ≤ value ≤ 1 (0 < value ≤ 1 when not ``closed``)."""
    ok = 0 <= value <= 1 if closed else 0 < value <= 1
    if not ok:
        interval = "[0, 1]" if closed else "(0, 1]"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")


def check_eps(eps: float) -> None:
    """Raise ``ValueError`` unless ``eps`` > 0."""
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")


def check_input(x: Tensor, num_features: int, layer: str) -> None:
    """Raise ``ValueError`` unless ``x`` is (N, num_features, H, W)."""
    if x.dim() != 4:
        raise ValueError(
            f"{layer} expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}"
        )
    if x.shape[1] != num_features:
        raise ValueError(
            f"{layer} was built for num_features={num_features} channels, "
            f"got an input with {x.shape[1]} (shape {tuple(x.shape)})"
        )
