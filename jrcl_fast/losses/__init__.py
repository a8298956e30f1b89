"""JRCL losses. Public functions check their arguments and dispatch to the fused
Triton kernels on CUDA tensors, or to the PyTorch reference (the specification)."""

from jrcl_fast.losses.classifier import ClassifierLoss, bdc_loss, ce_bdc_loss
from jrcl_fast.losses.contrastive import (
                                          global_one_to_all_supcon,
                                          mean_over_anchors_with_positives,
                                          o2a_per_anchor,
                                          one_to_all_supcon,
)

__all__ = [
    "ClassifierLoss",
    "bdc_loss",
    "ce_bdc_loss",
    "global_one_to_all_supcon",
    "mean_over_anchors_with_positives",
    "o2a_per_anchor",
    "one_to_all_supcon",
]
