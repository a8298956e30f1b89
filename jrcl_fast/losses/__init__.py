"""JRCL losses. Public functions check their arguments once and hand them, as one
argument bundle, to the fused Triton kernel on CUDA tensors or to the PyTorch reference
(the specification): `backend` ("auto", "torch", "triton", or an Impl) chooses."""

from jrcl_fast.kernels.specs import O2AArgs
from jrcl_fast.losses.classifier import ClassifierLoss, bdc_loss, ce_bdc_loss
from jrcl_fast.losses.contrastive import (
    global_one_to_all_supcon,
    mean_over_anchors_with_positives,
    o2a_per_anchor,
    one_to_all_supcon,
)
from jrcl_fast.losses.dispatch import Impl

__all__ = [
    "ClassifierLoss",
    "Impl",
    "O2AArgs",
    "bdc_loss",
    "ce_bdc_loss",
    "global_one_to_all_supcon",
    "mean_over_anchors_with_positives",
    "o2a_per_anchor",
    "one_to_all_supcon",
]
