"""PyTorch references of the JRCL losses: the executable specification (docs/METHOD.md).

They are the CPU path and the yardstick of the fused Triton kernels in
`jrcl_fast.kernels`, which take the same arguments and must return the same values.
The loss.divergence entries of BDC register here. The per-anchor and per-row functions
are unreduced so that the distributed trainer can contrast local anchors with keys
gathered from every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from jrcl_fast.registry import DIVERGENCES


def upcast(x: Tensor) -> Tensor:
    """Half-precision inputs are computed in float32; float32 and float64 as given."""
    return x.float() if x.element_size() < 4 else x


def o2a_per_anchor_reference(
    anchors: Tensor,
    anchor_labels: Tensor,
    keys: Tensor,
    key_labels: Tensor,
    anchor_offset: int,
    temperature: float,
    class_average: bool = True,
) -> tuple[Tensor, Tensor]:
    """One-to-All contrastive loss of each anchor against every key but itself.

    anchors: n x D, rows `anchor_offset .. anchor_offset + n - 1` of `keys` (M x D).
    Returns (loss n in at least float32, number of positives n int64). An anchor with no
    positive gets loss 0; the caller averages over anchors with positives.
    """
    n, m = anchors.shape[0], keys.shape[0]
    sim = (upcast(anchors) @ upcast(keys).T) / temperature  # n x M
    rows = torch.arange(n, device=anchors.device)
    is_self = torch.zeros(n, m, dtype=torch.bool, device=anchors.device)
    is_self[rows, rows + anchor_offset] = True
    same_class = anchor_labels[:, None] == key_labels[None, :]
    positive = same_class & ~is_self

    # Each key is weighted by 1/|A_c(i)|, the number of keys of its class other than
    # the anchor itself, so every class present counts once in the denominator.
    if class_average:
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


@dataclass(frozen=True)
class Divergence:
    """One loss.divergence: its reference per row, and the flag the fused kernel takes."""

    per_row: Callable[[Tensor, Tensor], Tensor]  # (log pi, log q), B x 2 each -> B
    kernel_sym_kl: bool  # fused_ce_bdc(sym_kl=...): the kernels know no names


def js_per_row(log_pi: Tensor, log_q: Tensor) -> Tensor:
    """JS(pi || q) per row, from log-probabilities."""
    pi, q = log_pi.exp(), log_q.exp()
    log_m = torch.logaddexp(log_pi, log_q) - math.log(2.0)
    return 0.5 * (pi * (log_pi - log_m)).sum(1) + 0.5 * (q * (log_q - log_m)).sum(1)


def sym_kl_per_row(log_pi: Tensor, log_q: Tensor) -> Tensor:
    """KL(pi || q) + KL(q || pi) per row, from log-probabilities."""
    return ((log_pi.exp() - log_q.exp()) * (log_pi - log_q)).sum(1)


DIVERGENCES.register("js", Divergence(js_per_row, kernel_sym_kl=False))
DIVERGENCES.register("sym_kl", Divergence(sym_kl_per_row, kernel_sym_kl=True))


def bdc_per_row_reference(logits: Tensor, binary_logits: Tensor, normal_mask: Tensor, divergence: str = "js") -> Tensor:
    """Binary Distribution Consistency of each row (B), unreduced."""
    return DIVERGENCES.get(divergence).per_row(*binary_distributions(logits, binary_logits, normal_mask))


def binary_targets(labels: Tensor, normal_mask: Tensor) -> Tensor:
    """The binary head's class of each label: 0 normal, 1 abnormal."""
    return (~normal_mask[labels]).long()


def ce_bdc_reference(
    logits: Tensor,
    binary_logits: Tensor,
    labels: Tensor,
    normal_mask: Tensor,
    logit_adjustment: Tensor | None = None,
    lambda_bin: float = 1.0,
    lambda_bdc: float = 1.0,
    divergence: str = "js",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Classifier half of the JRCL objective, averaged over the batch.

    Returns (total, ce, binary_ce, bdc) with total = ce + lambda_bin * binary_ce
    + lambda_bdc * bdc. `logit_adjustment` (C) is added to the logits for CE only:
    BDC compares the classifier's own distribution with the binary head. With no rows
    every term is NaN, torch's mean over nothing, and the gradients are empty.
    """
    adjusted = upcast(logits) if logit_adjustment is None else upcast(logits) + logit_adjustment
    ce = F.cross_entropy(adjusted, labels)
    binary_ce = F.cross_entropy(upcast(binary_logits), binary_targets(labels, normal_mask))
    bdc = bdc_per_row_reference(logits, binary_logits, normal_mask, divergence).mean()
    return ce + lambda_bin * binary_ce + lambda_bdc * bdc, ce, binary_ce, bdc
