"""PyTorch references of the JRCL losses: the executable specification (docs/METHOD.md).

They are the CPU path and the yardstick of the fused Triton kernels in
`jrcl_fast.kernels`, which take the same argument bundles (`jrcl_fast.kernels.specs`)
and must return the same values. The arguments arrive validated by the public
functions in `jrcl_fast.losses`; nothing here checks them again.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from jrcl_fast.kernels.specs import CEBDCArgs, O2AArgs


def upcast(x: Tensor) -> Tensor:
    """Half-precision inputs are computed in float32; float32 and float64 as given."""
    return x.float() if x.element_size() < 4 else x


def o2a_per_anchor_reference(args: O2AArgs) -> tuple[Tensor, Tensor]:
    """Per-anchor O2A loss (n, in at least float32) and number of positives (n, int64),
    row-wise and unreduced so that a rank can contrast its anchors with keys gathered
    from every rank. An anchor with no positive gets loss 0; the caller averages over
    anchors with positives."""
    anchors, anchor_labels, keys, key_labels = args.anchors, args.anchor_labels, args.keys, args.key_labels
    anchor_offset = args.anchor_offset
    n, m = anchors.shape[0], keys.shape[0]
    sim = (upcast(anchors) @ upcast(keys).T) / args.temperature  # n x M
    rows = torch.arange(n, device=anchors.device)
    is_self = torch.zeros(n, m, dtype=torch.bool, device=anchors.device)
    is_self[rows, rows + anchor_offset] = True
    same_class = anchor_labels[:, None] == key_labels[None, :]
    positive = same_class & ~is_self

    # Each key is weighted by 1/|A_c(i)|, the number of keys of its class other than
    # the anchor itself, so every class present counts once in the denominator.
    if args.class_average:
        class_count = torch.bincount(key_labels)[key_labels]  # M
        others = class_count[None, :] - same_class.long()  # |A_{label_j}(i)|
        log_weight = -torch.log(others.clamp(min=1).to(sim.dtype))
    else:
        log_weight = torch.zeros_like(sim)
    log_den = torch.logsumexp((sim + log_weight).masked_fill(is_self, -math.inf), dim=1)

    num_pos = positive.sum(dim=1)
    pos_mean = (sim * positive).sum(dim=1) / num_pos.clamp(min=1)
    loss = torch.where(num_pos > 0, log_den - pos_mean, torch.zeros_like(log_den))
    return loss, num_pos


def binary_distributions(logits: Tensor, binary_logits: Tensor, normal_mask: Tensor) -> tuple[Tensor, Tensor]:
    """log pi = log [p_normal, 1 - p_normal] and log q, both B x 2, in at least float32.

    The abnormal mass comes from its own log-sum-exp, not from log(1 - p_normal),
    so both stay finite when p_normal saturates at 0 or 1.
    """
    log_p = F.log_softmax(upcast(logits), dim=1)
    log_pi = torch.stack(
        [torch.logsumexp(log_p[:, normal_mask], dim=1), torch.logsumexp(log_p[:, ~normal_mask], dim=1)], dim=1
    )
    return log_pi, F.log_softmax(upcast(binary_logits), dim=1)


def divergence_per_row(log_pi: Tensor, log_q: Tensor, sym_kl: bool) -> Tensor:
    """KL(pi || q) + KL(q || pi) with `sym_kl`, else JS(pi || q), per row, from
    log-probabilities."""
    pi, q = log_pi.exp(), log_q.exp()
    if sym_kl:
        return ((pi - q) * (log_pi - log_q)).sum(1)
    log_m = torch.logaddexp(log_pi, log_q) - math.log(2.0)
    return 0.5 * (pi * (log_pi - log_m)).sum(1) + 0.5 * (q * (log_q - log_m)).sum(1)


def bdc_per_row_reference(logits: Tensor, binary_logits: Tensor, normal_mask: Tensor, sym_kl: bool) -> Tensor:
    """Binary Distribution Consistency of each row (B), unreduced."""
    return divergence_per_row(*binary_distributions(logits, binary_logits, normal_mask), sym_kl)


def binary_targets(labels: Tensor, normal_mask: Tensor) -> Tensor:
    """The binary head's class of each label: 0 normal, 1 abnormal."""
    return (~normal_mask[labels]).long()


def ce_bdc_reference(args: CEBDCArgs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Classifier half of the JRCL objective, averaged over the batch.

    Returns (total, ce, binary_ce, bdc) with total = ce + lambda_bin * binary_ce
    + lambda_bdc * bdc. The logit adjustment is added to the logits for CE only: BDC
    compares the classifier's own distribution with the binary head. A stop-gradient
    flag detaches that head's input to BDC alone. With no rows every term is NaN,
    torch's mean over nothing, and the gradients are empty.
    """
    logits, binary_logits, labels, normal_mask = args.logits, args.binary_logits, args.labels, args.normal_mask
    adjusted = upcast(logits) if args.logit_adjustment is None else upcast(logits) + args.logit_adjustment
    ce = F.cross_entropy(adjusted, labels)
    binary_ce = F.cross_entropy(upcast(binary_logits), binary_targets(labels, normal_mask))
    bdc = bdc_per_row_reference(logits if args.bdc_grad_to_logits else logits.detach(),
                                binary_logits if args.bdc_grad_to_binary else binary_logits.detach(),
                                normal_mask, args.sym_kl).mean()
    return ce + args.lambda_bin * binary_ce + args.lambda_bdc * bdc, ce, binary_ce, bdc
