"""Random training labels (``label_noise=p``), as in Zhang et al. 2016 ("Understanding deep
learning requires rethinking generalization") and the CE paper's Fig. 4b."""

from __future__ import annotations

import math

import torch

from .seeding import make_generator


def noisy_labels(
    labels: torch.Tensor, p: float, num_classes: int, *, seed: int = 0
) -> torch.Tensor:
    """Replace a fraction ``p`` of ``labels`` with labels drawn uniformly from all classes.

    Exactly ``round(p * N)`` samples, chosen at random, get a fresh uniform label; as the
    draw may repeat the old label, the expected fraction actually changed is
    ``p * (1 - 1/num_classes)``. The result depends only on (``labels``, ``p``, ``seed``).

    Args:
        labels: int64 ``[N]``.
        p: fraction in ``[0, 1]``.
        num_classes: number of classes ``K``; new labels lie in ``0..K-1``.
        seed: random seed.

    Returns:
        A new int64 ``[N]`` tensor (``labels`` is not modified).

    Raises:
        ValueError: ``p`` outside ``[0, 1]`` (or NaN), ``num_classes < 1``, ``labels`` not 1-D.
    """
    if not (isinstance(p, int | float) and math.isfinite(p) and 0.0 <= p <= 1.0):
        raise ValueError(f"label_noise must be a fraction in [0, 1], got {p!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    out = labels.clone()
    count = round(p * labels.numel())
    if count == 0:
        return out
    g = make_generator(seed, "label_noise")
    which = torch.randperm(labels.numel(), generator=g)[:count]
    out[which] = torch.randint(0, num_classes, (count,), generator=g, dtype=labels.dtype)
    return out
