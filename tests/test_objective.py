"""The JRCL objective composes the public losses as docs/METHOD.md section 3 says."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jrcl_fast.config import LossConfig, load_config
from jrcl_fast.errors import UserError
from jrcl_fast.losses import bdc_loss, objective, one_to_all_supcon
from jrcl_fast.losses.objective import JRCLObjective

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def inputs(batch=6, views=2, classes=5, dim=8):
    n = batch * views
    logits = torch.randn(n, classes, dtype=torch.float64, requires_grad=True)
    binary = torch.randn(n, 2, dtype=torch.float64, requires_grad=True)
    features = F.normalize(torch.randn(n, dim, dtype=torch.float64), dim=1).requires_grad_()
    protos = F.normalize(torch.randn(classes, dim, dtype=torch.float64), dim=1).requires_grad_()
    return logits, binary, features, protos, torch.randint(0, classes, (batch,))


@pytest.mark.parametrize("lambda_bdc", [1.5, 0.0])
def test_total_is_the_weighted_sum_over_the_right_views(lambda_bdc, monkeypatch):
    if not lambda_bdc:  # the binary head stays on, BDC must not be computed
        monkeypatch.setattr(objective, "ce_bdc_loss", lambda *_: pytest.fail("BDC computed at lambda_bdc = 0"))
    cfg = LossConfig(logit_adjust_tau=0.7, lambda_con=0.35, lambda_bdc=lambda_bdc, lambda_bin=0.5, temperature=0.2,
                     backend="torch")
    counts = np.array([100, 40, 10, 3, 1])
    normal = np.array([True, False, False, False, False])
    logits, binary, features, protos, labels = inputs()
    total, terms = JRCLObjective(cfg, counts, normal, torch.device("cpu"))(logits, binary, features, labels, 2, protos)

    b = labels.shape[0]
    prior = counts / counts.sum()
    ce = F.cross_entropy(logits[:b] + torch.tensor(0.7 * np.log(prior)), labels)  # view 0 only
    y_bin = torch.tensor([0 if normal[y] else 1 for y in labels])
    bce = F.cross_entropy(binary[:b], y_bin)
    bdc = bdc_loss(logits[:b], binary[:b], torch.tensor(normal))
    con = one_to_all_supcon(features, labels.repeat(2), protos, 0.2)  # every view
    want = ce + 0.5 * bce + lambda_bdc * bdc + 0.35 * con
    torch.testing.assert_close(total, want)
    # Only the terms in the loss are logged.
    assert set(terms) == {"ce", "binary_ce", "contrastive", "total"} | ({"bdc"} if lambda_bdc else set())
    for name, value in (("ce", ce), ("binary_ce", bce), ("bdc", bdc), ("contrastive", con)):
        if name in terms:
            torch.testing.assert_close(terms[name], value.detach())
    assert not any(t.requires_grad for t in terms.values())
    g_total = torch.autograd.grad(total, (logits, features, protos))
    g_want = torch.autograd.grad(want, (logits, features, protos))
    for g, w in zip(g_total, g_want):
        torch.testing.assert_close(g, w)
    assert g_total[0][b:].abs().max() == 0  # the second view's logits get no gradient


def test_zero_weights_skip_their_terms():
    cfg = LossConfig(lambda_con=0, lambda_bdc=0, lambda_bin=0, backend="torch")
    logits, binary, features, protos, labels = inputs()
    total, terms = JRCLObjective(cfg, np.array([5, 4, 3, 2, 1]), np.array([True] + [False] * 4),
                                 torch.device("cpu"))(logits, binary, features, labels, 2, protos)
    assert set(terms) == {"ce", "total"}
    torch.testing.assert_close(total, F.cross_entropy(logits[: labels.shape[0]], labels))


@pytest.mark.parametrize("stop", ["none", "classifier"])
def test_binary_head_without_binary_ce_and_bdc_stop_grad(stop):
    """loss.lambda_bin = 0 is allowed and leaves BDC alone to train the binary head;
    loss.bdc_stop_grad reaches BDC. Against the terms built here from torch and
    bdc_loss on detached inputs."""
    cfg = load_config(CONFIGS / "digits_lt.yaml", ["loss.lambda_bin=0", "loss.lambda_bdc=1.3", "loss.lambda_con=0",
                                                   f"loss.bdc_stop_grad={stop}", "loss.backend=torch"]).loss
    normal = np.array([True, True, False, False, False])
    logits, binary, features, protos, labels = inputs()
    total, terms = JRCLObjective(cfg, np.array([9, 7, 5, 3, 1]), normal, torch.device("cpu"))(
        logits, binary, features, labels, 2, protos)
    b = labels.shape[0]
    z = logits[:b].detach() if stop == "classifier" else logits[:b]
    want = F.cross_entropy(logits[:b], labels) + 1.3 * bdc_loss(z, binary[:b], torch.tensor(normal))
    torch.testing.assert_close(total, want)
    assert "binary_ce" in terms  # logged, though it does not train
    g_total = torch.autograd.grad(total, (logits, binary), allow_unused=True, materialize_grads=True)
    g_want = torch.autograd.grad(want, (logits, binary), allow_unused=True, materialize_grads=True)
    for g, w in zip(g_total, g_want):
        torch.testing.assert_close(g, w)
    assert g_total[1].abs().max() > 0  # BDC trains the binary head


def test_bdc_stop_grad_choice_is_validated_in_the_config():
    with pytest.raises(UserError, match=r"key 'loss\.bdc_stop_grad' must be one of"):
        load_config(CONFIGS / "digits_lt.yaml", ["loss.bdc_stop_grad=both"])
    # The binary head would get no gradient at all.
    with pytest.raises(UserError, match=r"'loss\.bdc_stop_grad' binary with 'loss\.lambda_bin' 0 leaves the binary"):
        load_config(CONFIGS / "digits_lt.yaml", ["loss.bdc_stop_grad=binary", "loss.lambda_bin=0"])
