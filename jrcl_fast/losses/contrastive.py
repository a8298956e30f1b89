"""One-to-All supervised contrastive loss (O2A), docs/METHOD.md section 1: the batch form,
the split form (anchors against an explicit key set) and the global form, in which each
rank contrasts its anchors with the features of every rank.

Each public function checks its arguments once, under the caller's names, then hands
one `O2AArgs` to the implementation `backend` selects (see dispatch.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from jrcl_fast.compat import all_gather_single_autograd
from jrcl_fast.kernels.specs import O2AArgs
from jrcl_fast.losses.checks import check_o2a_args
from jrcl_fast.losses.dispatch import Impl, implementation, select_impl
from jrcl_fast.runtime import gather_rows


def _per_anchor(args: O2AArgs, backend: str | Impl) -> tuple[Tensor, Tensor]:
    """The selected implementation on checked arguments."""
    return implementation("o2a", select_impl(backend, args.anchors, args.keys))(args)


def o2a_per_anchor(args: O2AArgs, backend: str | Impl = "auto") -> tuple[Tensor, Tensor]:
    """Per-anchor O2A loss (n) and number of positives (n) of the split form: anchors
    against an explicit key set, of which they are rows `args.anchor_offset ..`."""
    check_o2a_args(args.anchors, args.anchor_labels, args.temperature, keys=args.keys, key_labels=args.key_labels,
                   anchor_offset=args.anchor_offset, names=("anchors", "anchor_labels"))
    return _per_anchor(args, backend)


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
    backend: str | Impl = "auto",
) -> Tensor:
    """O2A loss of N features (rows used as given) against [features; prototypes].

    With `prototypes=None` it is class-averaged SupCon over the batch; with
    `class_average=False` as well, it is plain SupCon.
    """
    # Before the concatenation, which would fail on a prototype of the wrong width.
    check_o2a_args(features, labels, temperature, prototypes)
    keys, key_labels = append_prototypes(features, labels, prototypes)
    loss, num_pos = _per_anchor(O2AArgs(features, labels, keys, key_labels, 0, temperature, class_average), backend)
    return mean_over_anchors_with_positives(loss, num_pos)


def global_one_to_all_supcon(features: Tensor, labels: Tensor, prototypes: Tensor | None = None,
                             temperature: float = 0.1, class_average: bool = True,
                             backend: str | Impl = "auto") -> Tensor:
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
    loss, num_pos = _per_anchor(O2AArgs(features, labels, keys, key_labels, dist.get_rank() * n, temperature,
                                        class_average), backend)
    count = (num_pos > 0).sum()
    dist.all_reduce(count)  # an integer count: no gradient flows through it
    return mean_over_anchors_with_positives(loss, num_pos, count) * world
