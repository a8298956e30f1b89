"""Which sample indices each rank sees in an epoch, for every loader.

One function serves the torchvision and DALI paths, so both walk the same samples.
"""

from __future__ import annotations

import numpy as np


def sampling_weights(labels: np.ndarray, mode: str) -> np.ndarray | None:
    """Per-sample probabilities: None for plain shuffling, else proportional to
    n_c^-1 (class-balanced) or n_c^-1/2 (square-root)."""
    if mode == "instance":
        return None
    counts = np.bincount(labels).astype(np.float64)
    power = {"class_balanced": 1.0, "sqrt": 0.5}[mode]
    weights = counts[labels] ** -power
    return weights / weights.sum()


def epoch_indices(labels: np.ndarray, mode: str, seed: int, epoch: int, batch_size: int,
                  rank: int = 0, world_size: int = 1) -> np.ndarray:
    """This rank's training indices for one epoch, a whole number of batches.

    Every rank draws the same global order from (seed, epoch) and keeps whole
    global batches of world_size * batch_size; rank r takes the r-th slice of each,
    so the ranks' batches laid end to end are the single-process batch, and all
    ranks run the same number of steps.
    """
    rng = np.random.default_rng([seed, epoch])
    n = len(labels)
    weights = sampling_weights(labels, mode)
    order = rng.permutation(n) if weights is None else rng.choice(n, size=n, replace=True, p=weights)
    per_step = world_size * batch_size
    steps = n // per_step
    return order[: steps * per_step].reshape(steps, world_size, batch_size)[:, rank].reshape(-1)


def eval_indices(n: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """Every sample exactly once across ranks, in order."""
    return np.arange(rank, n, world_size)
