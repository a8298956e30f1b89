"""The argument bundle of each loss, taken alike by its PyTorch reference
(`jrcl_fast.losses.reference`) and its fused kernel, so a new parameter is one field
here, read by both.

The public functions in `jrcl_fast.losses` build these once per call from the names a
user writes (validated there), and choose the implementation. The bundles hold codes,
not names, so that this leaf knows nothing of the configuration.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class O2AArgs:
    """One-to-All contrastive loss of each anchor against every key but itself.

    The anchors (n x D) are rows `anchor_offset .. anchor_offset + n - 1` of the keys
    (M x D), with the same labels: this split form lets a rank contrast its local
    anchors with keys gathered from every rank. `class_average` weights each key by
    1 / (number of keys of its class other than the anchor); without it, plain SupCon.
    """

    anchors: Tensor
    anchor_labels: Tensor
    keys: Tensor
    key_labels: Tensor
    anchor_offset: int
    temperature: float
    class_average: bool = True


@dataclass(frozen=True)
class CEBDCArgs:
    """CE (optionally logit-adjusted) + lambda_bin * binary CE + lambda_bdc * BDC.

    logits B x C, binary_logits B x 2 (column 0 is normal), labels B in [0, C),
    normal_mask C booleans, logit_adjustment C (added to the logits for CE only).
    `sym_kl` picks BDC's divergence: symmetric KL, else Jensen-Shannon. The stop-gradient
    flags keep BDC's gradient from the classifier logits or from the binary head (the
    CE terms still train both).
    """

    logits: Tensor
    binary_logits: Tensor
    labels: Tensor
    normal_mask: Tensor
    logit_adjustment: Tensor | None = None
    lambda_bin: float = 1.0
    lambda_bdc: float = 1.0
    sym_kl: bool = False
    bdc_grad_to_logits: bool = True
    bdc_grad_to_binary: bool = True
