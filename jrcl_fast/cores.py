"""The CPU cores this process may use, and the loader workers a rank gets by default.

Torch-free, so that check-data and the start-up display can ask before torch loads.
"""

from __future__ import annotations

import os

# Local ranks on this node: torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE.
LOCAL_SIZE_VARIABLES = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")


def available_cores() -> int:
    """Cores this process may run on: its affinity mask (a cgroup or `taskset` limit),
    not the machine's count, which os.cpu_count() gives."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def local_ranks() -> int:
    """Ranks on this node, as the launcher says; 1 without one."""
    for name in LOCAL_SIZE_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def workers_per_rank(requested: int | None) -> tuple[int, str]:
    """data.num_workers for this rank and why: `requested` when the config sets it, else
    the cores available per local rank (each rank's loader then has its share of the
    node, never more than the cores). Returns (workers, the reason in words)."""
    cores, ranks = available_cores(), local_ranks()
    share = f"{cores} cores" + (f" / {ranks} local ranks" if ranks > 1 else "")
    if requested is not None:
        return requested, f"data.num_workers; {share}"
    return cores // ranks, f"default: {share}"
