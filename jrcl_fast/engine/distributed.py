"""The global contrastive batch: each rank contrasts its own anchors with the features
of every rank, and the gradients equal those of one process on the concatenated batch
(tests/test_distributed.py checks it against a naive gather).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from jrcl_fast.compat import all_gather_single_autograd
from jrcl_fast.losses.checks import check_o2a_args
from jrcl_fast.losses.contrastive import append_prototypes, mean_over_anchors_with_positives, o2a_per_anchor
from jrcl_fast.runtime import gather_rows


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
