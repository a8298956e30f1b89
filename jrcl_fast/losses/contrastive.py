"""One-to-All supervised contrastive loss (O2A), docs/METHOD.md section 1: the batch form,
the split form (anchors against an explicit key set) and the global form, in which each
rank contrasts its anchors with the features of every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from jrcl_fast.compat import all_gather_single_autograd
from jrcl_fast.losses.checks import check_o2a_args
from jrcl_fast.losses.dispatch import use_kernels
from jrcl_fast.losses.reference import o2a_per_anchor_reference
from jrcl_fast.runtime import gather_rows


def o2a_per_anchor(
    anchors: Tensor,
    anchor_labels: Tensor,
    keys: Tensor,
    key_labels: Tensor,
    anchor_offset: int,
    temperature: float,
    class_average: bool = True,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Per-anchor O2A loss and positive count against an explicit key set.

    The anchors are rows `anchor_offset ..` of the keys. This split form lets a rank
    contrast its local anchors with keys gathered from all ranks.
    """
    check_o2a_args(anchors, anchor_labels, temperature, keys=keys, key_labels=key_labels,
                   anchor_offset=anchor_offset, names=("anchors", "anchor_labels"))
    if use_kernels(backend, anchors, keys):
        from jrcl_fast.kernels.o2a import fused_o2a_per_anchor

        fn = fused_o2a_per_anchor
    else:
        fn = o2a_per_anchor_reference
    return fn(anchors, anchor_labels, keys, key_labels, anchor_offset, temperature, class_average)


def mean_over_anchors_with_positives(loss: Tensor, num_pos: Tensor, denominator: Tensor | None = None) -> Tensor:
    """Average of the per-anchor losses over anchors with a positive; 0 (with zero
    gradients, not NaN) when there is none. `denominator` overrides the count, as
    the distributed trainer does with the global count."""
    count = (num_pos > 0).sum() if denominator is None else denominator
    return loss.sum() / count.clamp(min=1)


def append_prototypes(keys: Tensor, key_labels: Tensor, prototypes: Tensor | None) -> tuple[Tensor, Tensor]:
    """The contrast set [keys; prototypes] with labels [key_labels; 0..C-1]."""
    if prototypes is None:
        return keys, key_labels
    arange = torch.arange(prototypes.shape[0], device=key_labels.device, dtype=key_labels.dtype)
    return torch.cat([keys, prototypes.to(keys.dtype)]), torch.cat([key_labels, arange])


def one_to_all_supcon(
    features: Tensor,
    labels: Tensor,
    prototypes: Tensor | None = None,
    temperature: float = 0.1,
    class_average: bool = True,
    backend: str = "auto",
) -> Tensor:
    """O2A loss of N features (rows used as given) against [features; prototypes].

    With `prototypes=None` it is class-averaged SupCon over the batch; with
    `class_average=False` as well, it is plain SupCon.
    """
    # Under the caller's names and before the concatenation, which would fail on a
    # prototype of the wrong width; o2a_per_anchor then checks the assembled key set.
    check_o2a_args(features, labels, temperature, prototypes)
    keys, key_labels = append_prototypes(features, labels, prototypes)
    loss, num_pos = o2a_per_anchor(features, labels, keys, key_labels, 0, temperature, class_average, backend)
    return mean_over_anchors_with_positives(loss, num_pos)


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
