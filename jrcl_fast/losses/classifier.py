"""Classifier losses: BDC alone, and CE + binary CE + BDC fused (docs/METHOD.md section 2)."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from jrcl_fast.losses.checks import check_choice, check_labels, check_matrix, check_normal_mask
from jrcl_fast.losses.dispatch import use_kernels
from jrcl_fast.losses.reference import bdc_per_row_reference, ce_bdc_reference
from jrcl_fast.registry import DIVERGENCES


class ClassifierLoss(NamedTuple):
    """`total` carries the gradients; the terms are for logging."""

    total: Tensor
    ce: Tensor
    binary_ce: Tensor
    bdc: Tensor


def _check_heads(logits: Tensor, binary_logits: Tensor, normal_mask: Tensor, divergence: str) -> None:
    check_matrix("logits", logits)
    check_matrix("binary_logits", binary_logits, rows=logits.shape[0], cols=2)
    check_normal_mask(normal_mask, logits.shape[1])
    check_choice("divergence", divergence, DIVERGENCES.names())


def bdc_loss(logits: Tensor, binary_logits: Tensor, normal_mask: Tensor, divergence: str = "js") -> Tensor:
    """Mean over the batch of the divergence between the classifier's normal/abnormal
    mass and the binary head's distribution. Column 0 of `binary_logits` is normal."""
    _check_heads(logits, binary_logits, normal_mask, divergence)
    return bdc_per_row_reference(logits, binary_logits, normal_mask, divergence).mean()


def ce_bdc_loss(
    logits: Tensor,
    binary_logits: Tensor,
    labels: Tensor,
    normal_mask: Tensor,
    logit_adjustment: Tensor | None = None,
    lambda_bin: float = 1.0,
    lambda_bdc: float = 1.0,
    divergence: str = "js",
    backend: str = "auto",
) -> ClassifierLoss:
    """CE (optionally logit-adjusted) + lambda_bin * binary CE + lambda_bdc * BDC."""
    _check_heads(logits, binary_logits, normal_mask, divergence)
    check_labels("labels", labels, logits.shape[0], logits.shape[1])
    if logit_adjustment is not None and logit_adjustment.shape != (logits.shape[1],):
        raise ValueError(
            f"logit_adjustment must be a vector of length C = {logits.shape[1]}, "
            f"got shape {tuple(logit_adjustment.shape)}"
        )
    args = (logits, binary_logits, labels, normal_mask, logit_adjustment, lambda_bin, lambda_bdc)
    if use_kernels(backend, logits, binary_logits):
        from jrcl_fast.kernels.ce_bdc import fused_ce_bdc

        return ClassifierLoss(*fused_ce_bdc(*args, sym_kl=DIVERGENCES.get(divergence).kernel_sym_kl))
    return ClassifierLoss(*ce_bdc_reference(*args, divergence))
