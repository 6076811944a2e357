"""Seeded, class-balanced training subsets (``train_subset=N``) and the fixed evaluation order."""

from __future__ import annotations

import torch

from .seeding import make_generator


def balanced_subset(labels: torch.Tensor, n: int, *, seed: int = 0) -> torch.Tensor:
    """Indices of ``n`` samples, spread over the classes as evenly as the data allow.

    Samples are taken round-robin over classes in a seeded random order, so class counts
    differ by at most one unless a class runs out. The result depends only on
    (``labels``, ``n``, ``seed``).

    Args:
        labels: int64 ``[N]`` class labels.
        n: subset size, ``1 <= n <= N``.
        seed: random seed.

    Returns:
        int64 ``[n]`` indices into ``labels``, sorted ascending.

    Raises:
        ValueError: if ``n`` is outside ``1..N`` or ``labels`` is not 1-D.
    """
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    total = labels.numel()
    if not 1 <= n <= total:
        raise ValueError(f"subset size must be between 1 and {total} (the data size), got {n}")
    perm = torch.randperm(total, generator=make_generator(seed, "train_subset"))
    shuffled = labels[perm]
    order = torch.sort(shuffled, stable=True).indices  # grouped by class, random within class
    sorted_labels = shuffled[order]
    starts = torch.searchsorted(sorted_labels, sorted_labels, right=False)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(total) - starts  # rank of each shuffled sample within its class
    key = rank * total + torch.arange(total)  # round-robin: all rank-0 samples first, ...
    chosen = perm[torch.argsort(key)[:n]]
    return torch.sort(chosen).values


EVAL_ORDER_SEED = 0
"""Seed of the evaluation order: the same for every run, so analyses of different runs that
look at the first batches of the test set look at the same images."""


def eval_order(n: int) -> torch.Tensor:
    """A fixed random permutation of ``n`` test samples (int64 ``[n]``).

    Test sets are often stored sorted by class (the CIFAR-10 JPEG archive, every ImageFolder
    tree), so the first batches of an unshuffled loader would hold one or two classes. The
    test loaders use this order instead, so that any run of first batches (``cenet analyze
    --batches``, ``record_channels``) is a uniform sample of the test set. Full evaluations
    are unaffected: they see every sample once.
    """
    return torch.randperm(n, generator=make_generator(EVAL_ORDER_SEED))
