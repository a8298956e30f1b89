"""Ranks: who am I, starting the process group, and the collectives the trainer needs.

The global contrastive batch lives here: each rank contrasts its own anchors with the
features of every rank, and the gradients equal those of one process on the
concatenated batch (tests/test_distributed.py checks it against a naive gather).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed._functional_collectives import all_gather_single_autograd

from jrcl_fast.errors import RankFailure
from jrcl_fast.losses.checks import check_o2a_args
from jrcl_fast.losses.contrastive import append_prototypes, mean_over_anchors_with_positives, o2a_per_anchor


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_ranks(local_rank_arg: int | None = None) -> Ranks:
    """Ranks as set by the deepspeed launcher or torchrun (env), else one process.
    `local_rank_arg` is the `--local_rank` the deepspeed launcher passes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    return Ranks(int(os.environ.get("RANK", "0")), world, local)


def init_process_group(ranks: Ranks, timeout_s: float) -> None:
    """Start the process group through DeepSpeed (gloo on CPU, nccl on GPU).

    The timeout bounds every collective: a dead or stuck rank ends the job instead of
    hanging it forever.
    """
    import deepspeed

    if ranks.world_size == 1:  # started without a launcher: a one-rank group on this host
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# How gloo and NCCL word a lost or silent peer when they raise a plain RuntimeError.
PEER_LOST = ("gloo", "NCCL", "Connection reset", "Connection closed", "timed out", "Timeout")


@contextmanager
def collective_failures() -> Iterator[None]:
    """Turn a failed or timed-out collective into one clear RankFailure.

    It wraps every phase that talks to the other ranks: the whole of `train` (engine
    start-up, resume, the loop, checkpoint barriers) and the evaluation gather. A
    one-process job has no other rank to blame, so its errors pass unchanged.
    """
    try:
        yield
    except RuntimeError as err:  # DistError, or gloo's plain RuntimeError on a lost peer
        ranks = launched_ranks()
        if ranks.world_size == 1 or not (isinstance(err, dist.DistError) or any(m in str(err) for m in PEER_LOST)):
            raise
        raise RankFailure(
            f"rank {ranks.rank} of {ranks.world_size}: a collective with the other ranks failed or waited "
            "longer than train.collective_timeout_s, so another rank probably died or hangs "
            f"(see its log); {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err


def gather_rows(x: Tensor) -> Tensor:
    """All ranks' rows of `x` in rank order, without gradient."""
    out = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous())
    return out


def global_one_to_all_supcon(features: Tensor, labels: Tensor, prototypes: Tensor | None = None,
                             temperature: float = 0.1, class_average: bool = True,
                             backend: str = "auto") -> Tensor:
    """O2A loss of this rank's anchors against [features of all ranks; prototypes].

    Drop-in for `one_to_all_supcon` under data parallelism. The gather is
    differentiable, so the gradient of a key reaches the rank that computed it. The sum
    is normalised by the global number of anchors with positives and multiplied by the
    world size because DeepSpeed averages gradients over ranks: after that average the
    gradient is exactly that of one process on the concatenated batch. The mean over
    ranks of the returned value is the global loss.
    """
    # Before the gather: a malformed tensor would fail inside the collective, or hang it.
    check_o2a_args(features, labels, temperature, prototypes)
    world, n = dist.get_world_size(), features.shape[0]
    keys, key_labels = append_prototypes(all_gather_single_autograd(features.contiguous(), 0, dist.group.WORLD),
                                         gather_rows(labels), prototypes)
    loss, num_pos = o2a_per_anchor(features, labels, keys, key_labels, dist.get_rank() * n, temperature,
                                   class_average, backend)
    count = (num_pos > 0).sum()
    dist.all_reduce(count)  # an integer count: no gradient flows through it
    return mean_over_anchors_with_positives(loss, num_pos, count) * world


def mean_over_ranks(values: dict[str, Tensor]) -> dict[str, float]:
    """Mean over ranks of scalar tensors, in one all-reduce; plain floats on one process."""
    if not is_distributed():
        return {name: float(v) for name, v in values.items()}
    stacked = torch.stack([v.detach().float() for v in values.values()])
    dist.all_reduce(stacked)
    return dict(zip(values, (stacked / dist.get_world_size()).tolist()))


def gather_shards(shard: np.ndarray, positions: list[np.ndarray]) -> np.ndarray:
    """Reassemble a per-sample array from every rank's shard.

    `positions[r]` are the sample indices rank r evaluated (sampling.eval_indices); the
    result is in sample order and raises if a sample is missing or counted twice.
    """
    shards = [shard] if not is_distributed() else [None] * dist.get_world_size()
    if is_distributed():
        with collective_failures():
            dist.all_gather_object(shards, shard)
    n = sum(len(p) for p in positions)
    seen = np.bincount(np.concatenate(positions), minlength=n)
    if len(seen) != n or not (seen == 1).all() or any(len(s) != len(p) for s, p in zip(shards, positions)):
        raise RuntimeError("the evaluation shards do not cover every test sample exactly once")
    out = np.empty(n, dtype=shard.dtype)
    for s, p in zip(shards, positions):
        out[p] = s
    return out
