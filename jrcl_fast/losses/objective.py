"""The JRCL objective: CE + lambda_bin * binary CE + lambda_bdc * BDC + lambda_con * O2A."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from jrcl_fast.config import LossConfig
from jrcl_fast.losses.classifier import ce_bdc_loss
from jrcl_fast.losses.contrastive import global_one_to_all_supcon, one_to_all_supcon
from jrcl_fast.losses.reference import binary_targets, upcast
from jrcl_fast.runtime import is_distributed


def logit_adjustment(train_counts: np.ndarray, tau: float) -> Tensor | None:
    """tau * log(class prior), added to the logits of the CE term; None when tau = 0."""
    if tau == 0:
        return None
    prior = np.maximum(train_counts, 1) / np.maximum(train_counts, 1).sum()
    return torch.tensor(tau * np.log(prior), dtype=torch.float32)


class JRCLObjective:
    """Weighted sum of the JRCL terms; a weight of 0 skips its term entirely."""

    def __init__(self, cfg: LossConfig, train_counts: np.ndarray, normal_mask: np.ndarray, device: torch.device):
        self.cfg = cfg
        adjustment = logit_adjustment(train_counts, cfg.logit_adjust_tau)
        self.adjustment = None if adjustment is None else adjustment.to(device)
        # A copy, not a view of the array: the CE+BDC kernel caches its groups per mask tensor.
        self.normal_mask = torch.tensor(normal_mask, dtype=torch.bool, device=device)

    def __call__(self, logits: Tensor, binary_logits: Tensor, features: Tensor, labels: Tensor,
                 num_views: int, prototypes: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """Rows of the model outputs are view-major: [view 0 of the batch; view 1; ...].
        The classifier terms use view 0; the contrastive term uses every view.

        Returns the total loss and each term, detached, for logging.
        """
        cfg = self.cfg
        batch = labels.shape[0]
        logits0, binary0 = logits[:batch], binary_logits[:batch]
        terms: dict[str, Tensor] = {}
        if cfg.lambda_bdc:
            # One fused pass gives CE, binary CE and BDC; the binary CE, free there, is
            # logged even when lambda_bin = 0.
            classifier = ce_bdc_loss(logits0, binary0, labels, self.normal_mask, self.adjustment,
                                     cfg.lambda_bin, cfg.lambda_bdc, cfg.divergence, cfg.backend, cfg.bdc_stop_grad)
            total = classifier.total
            terms.update(ce=classifier.ce, binary_ce=classifier.binary_ce, bdc=classifier.bdc)
        else:  # BDC is neither computed nor logged
            adjusted = logits0 if self.adjustment is None else logits0 + self.adjustment
            total = terms["ce"] = F.cross_entropy(upcast(adjusted), labels)
            if cfg.lambda_bin:
                terms["binary_ce"] = F.cross_entropy(upcast(binary0), binary_targets(labels, self.normal_mask))
                total = total + cfg.lambda_bin * terms["binary_ce"]
        if cfg.lambda_con:
            # Under data parallelism every rank's anchors meet the keys of all ranks.
            o2a = global_one_to_all_supcon if is_distributed() else one_to_all_supcon
            contrastive = o2a(
                features, labels.repeat(num_views), prototypes if cfg.use_prototypes else None,
                cfg.temperature, cfg.class_average, cfg.backend,
            )
            total = total + cfg.lambda_con * contrastive
            terms["contrastive"] = contrastive
        terms["total"] = total
        return total, {name: value.detach() for name, value in terms.items()}
