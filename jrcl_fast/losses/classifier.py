"""Classifier losses: BDC alone, and CE + binary CE + BDC fused (docs/METHOD.md section 2).

The public functions check their arguments once and turn the names a user writes
(divergence, stop-gradient side) into the codes of one `CEBDCArgs`, which the
implementation `backend` selects takes (see dispatch.py)."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from jrcl_fast.config import BDC_STOP_GRADS, DIVERGENCES
from jrcl_fast.kernels.specs import CEBDCArgs
from jrcl_fast.losses.checks import check_choice, check_labels, check_matrix, check_normal_mask
from jrcl_fast.losses.dispatch import Impl, implementation, select_impl
from jrcl_fast.losses.reference import bdc_per_row_reference


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
    check_choice("divergence", divergence, DIVERGENCES)


def bdc_loss(logits: Tensor, binary_logits: Tensor, normal_mask: Tensor, divergence: str = "js") -> Tensor:
    """Mean over the batch of the divergence between the classifier's normal/abnormal
    mass and the binary head's distribution. Column 0 of `binary_logits` is normal."""
    _check_heads(logits, binary_logits, normal_mask, divergence)
    return bdc_per_row_reference(logits, binary_logits, normal_mask, sym_kl=divergence == "sym_kl").mean()


def ce_bdc_loss(
    logits: Tensor,
    binary_logits: Tensor,
    labels: Tensor,
    normal_mask: Tensor,
    logit_adjustment: Tensor | None = None,
    lambda_bin: float = 1.0,
    lambda_bdc: float = 1.0,
    divergence: str = "js",
    backend: str | Impl = "auto",
    bdc_stop_grad: str = "none",
) -> ClassifierLoss:
    """CE (optionally logit-adjusted) + lambda_bin * binary CE + lambda_bdc * BDC.

    `bdc_stop_grad` names the head BDC's gradient does not reach ("classifier" or
    "binary"; "none" trains both), as loss.bdc_stop_grad in the config."""
    _check_heads(logits, binary_logits, normal_mask, divergence)
    check_labels("labels", labels, logits.shape[0], logits.shape[1])
    if logit_adjustment is not None and logit_adjustment.shape != (logits.shape[1],):
        raise ValueError(
            f"logit_adjustment must be a vector of length C = {logits.shape[1]}, "
            f"got shape {tuple(logit_adjustment.shape)}"
        )
    check_choice("bdc_stop_grad", bdc_stop_grad, BDC_STOP_GRADS)
    args = CEBDCArgs(logits, binary_logits, labels, normal_mask, logit_adjustment, lambda_bin, lambda_bdc,
                     sym_kl=divergence == "sym_kl", bdc_grad_to_logits=bdc_stop_grad != "classifier",
                     bdc_grad_to_binary=bdc_stop_grad != "binary")
    return ClassifierLoss(*implementation("ce_bdc", select_impl(backend, logits, binary_logits))(args))
