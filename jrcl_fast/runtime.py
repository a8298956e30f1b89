"""Where this process runs: its ranks, its device, the process group and the collectives.

A neutral layer below losses, engine and evaluation: each of them asks this module who
the rank is, which device it owns and how to reduce or gather across ranks, and none of
them imports another for it.

Device selection (`train.device`): `cpu` runs on the CPU whatever hardware is present
(gloo, DeepSpeed's CPU accelerator); `cuda` needs a GPU per local rank; `auto` takes the
GPU of the local rank when torch sees one and `DS_ACCELERATOR` does not ask for the CPU.
A rank whose local index has no GPU is refused in one line instead of failing inside
CUDA with "invalid device ordinal".
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from jrcl_fast.errors import RankFailure, UserError
from jrcl_fast.network import start_process_group


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


def runs_on_cpu(requested: str) -> bool:
    """Whether `train.device` = `requested` means CPU ranks on this machine."""
    return requested == "cpu" or (requested == "auto" and (
        os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()))


def select_device(requested: str, ranks: Ranks) -> torch.device:
    """This rank's device for `train.device` = `requested`. A GPU becomes the current
    CUDA device too, which is where DALI decodes. Choosing the CPU on a machine with
    GPUs also points DeepSpeed's accelerator (and with it DALI, dali_on_gpu) at the CPU,
    so all agree."""
    accelerator = os.environ.get("DS_ACCELERATOR")
    if runs_on_cpu(requested):
        if accelerator not in (None, "cpu"):
            raise UserError(f"train.device={requested} runs on the CPU but DS_ACCELERATOR={accelerator}; "
                            "unset DS_ACCELERATOR or set it to cpu")
        if torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
        return torch.device("cpu")
    if accelerator not in (None, "cuda"):
        raise UserError(f"train.device={requested} asks for a GPU but DS_ACCELERATOR={accelerator}; "
                        "unset DS_ACCELERATOR or set train.device=cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UserError(f"train.device={requested} asks for a GPU but torch sees no CUDA GPU on this machine; "
                        "set train.device=auto or cpu")
    if ranks.local_rank >= count:
        raise UserError(f"rank {ranks.rank} has local rank {ranks.local_rank} but this node has {count} GPU(s); "
                        f"launch at most {count} rank(s) per node (deepspeed --num_gpus {max(count, 1)}), or set "
                        "train.device=cpu (with DS_ACCELERATOR=cpu) for CPU ranks")
    torch.cuda.set_device(ranks.local_rank)
    return torch.device("cuda", ranks.local_rank)


def init_process_group(ranks: Ranks, device: torch.device, timeout_s: float) -> None:
    """Start the process group through DeepSpeed: nccl for GPU ranks, gloo for CPU ranks.

    The timeout bounds every collective: a dead or stuck rank ends the job instead of
    hanging it forever. With several ranks it bounds the start-up too (jrcl_fast.network:
    the interface each host uses, the rendezvous, the connections, a first all-reduce).
    """
    import deepspeed

    if ranks.world_size == 1:  # started without a launcher: a one-rank group on this host
        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(name, value)
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type != "cuda":  # only DeepSpeed's CPU accelerator builds it; no op-table probe on GPUs
        skip_shared_memory_all_reduce()
    if ranks.world_size > 1:  # started here, bounded and explained; DeepSpeed adopts the group
        start_process_group(ranks.rank, ranks.local_rank, ranks.world_size, backend, device, timeout_s)
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))


# DeepSpeed's shared-memory all-reduce for CPU ranks (ShareMemCommBuilder).
SHM_ALL_REDUCE_OP = "deepspeed_shm_comm"


def skip_shared_memory_all_reduce() -> None:
    """Keep DeepSpeed's CPU backend from compiling and mapping its shared-memory all-reduce.

    Only DeepSpeed's inference path uses it (training reduces through gloo), yet every CPU
    job compiled it (minutes on first use) and left two 69 MB /dev/shm segments per rank
    that nothing unlinks: /dev/shm fills over many jobs, and a filled /dev/shm is a known
    cause of crashing ranks (sglang#38638). A CI run crashed one rank with heap corruption
    while it was loaded.
    """
    import deepspeed.ops

    # DeepSpeed probes this table once and keeps it, so that edits to it persist.
    deepspeed.ops.__compatible_ops__[SHM_ALL_REDUCE_OP] = False


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# How gloo and NCCL word a peer that closed its connections (it died or was stopped), a
# wait that ran out, and any other failure of theirs. NCCL's own misconfigurations (no
# shared transport, wrong interface) are not a dead rank: only its words for a vanished or
# aborted peer are listed.
PEER_CLOSED = ("Connection reset", "Connection closed", "remote process exited", "NCCL communicator was aborted",
               "ncclRemoteError")
TIMED_OUT = ("timed out", "timeout")  # compared in lower case
PEER_LOST = ("gloo", *PEER_CLOSED, "timed out", "Timed out", "Timeout")


def what_the_peers_did(err: Exception) -> str:
    """What the evidence in a failed collective's error says about the other ranks."""
    text = str(err)
    if any(m in text for m in PEER_CLOSED):
        return "failed: another rank closed its connection, so it died or was stopped (see its log)"
    if any(m in text.lower() for m in TIMED_OUT):
        return ("waited longer than train.collective_timeout_s: another rank hangs, or died without closing its "
                "connection (see the other ranks' logs)")
    return "failed (see the other ranks' logs)"


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
            f"rank {ranks.rank} of {ranks.world_size}: a collective with the other ranks {what_the_peers_did(err)}; "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err


def gather_rows(x: Tensor) -> Tensor:
    """All ranks' rows of `x` in rank order, without gradient."""
    from jrcl_fast.compat import all_gather_single

    out = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))
    all_gather_single(out, x.contiguous())
    return out


def mean_over_ranks(values: Tensor) -> Tensor:
    """Mean over ranks of `values` (fp32), in one all-reduce; `values` itself on one process."""
    values = values.detach().float()
    if not is_distributed():
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


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
