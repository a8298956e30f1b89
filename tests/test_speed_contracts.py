"""Speed contracts that no result shows when broken, from the model to the kernel launch:
the classifier pads its logit rows to a multiple of 8 classes (16-byte vectors of bf16),
the CE+BDC kernel reads the model's bf16 logits in place (no float32 copy of the N x C
logits) and writes their gradient at the same aligned stride, and the normal group's
tensors are built once per run, not every step (the cache keyed on the mask's version
counter; tests/test_kernel_ce_bdc.py checks that a changed mask rebuilds them)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jrcl_fast.config import LossConfig, ModelConfig
from jrcl_fast.engine.backends import LocalEngine
from jrcl_fast.engine.trainer import train_step
from jrcl_fast.kernels import ce_bdc
from jrcl_fast.losses.objective import JRCLObjective
from jrcl_fast.models import JRCLNet
from jrcl_fast.models.jrcl_net import LOGIT_ROW_ALIGNMENT

SMALL = {"backbone": "resnet32", "projection_dim": 8, "projection_hidden_dim": 16}


def test_the_alignment_is_16_bytes_of_bf16():
    assert LOGIT_ROW_ALIGNMENT * torch.finfo(torch.bfloat16).bits // 8 == 16


@pytest.mark.parametrize("classifier", ["linear", "cosine"])
@pytest.mark.parametrize("classes", [1, 5, 8, 13, 100, 8142])
def test_logit_rows_are_padded_to_a_multiple_of_8_classes(classes, classifier):
    model = JRCLNet(ModelConfig(**SMALL, classifier=classifier), classes)
    width = model.classifier.weight.shape[1]
    logits = model.classifier(torch.randn(3, width))
    assert logits.shape == (3, classes) and logits.stride() == (math.ceil(classes / 8) * 8, 1)


class LaunchSpy:
    """Stands in for the CE+BDC kernel: records each launch's arguments, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(**kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](**kwargs)

        return launch


def test_the_kernel_reads_the_models_bf16_logits_in_place_and_builds_the_groups_once(monkeypatch, device):
    """Three training steps of a bf16 model through train_step and the objective, as a
    bf16 engine runs them: every launch gets the model's own logits tensor (bf16, its
    aligned row stride, the same memory), a gradient buffer at that stride, and the
    normal group built at the first step only. (On a GPU machine, on the GPU.)"""
    classes, device = 13, torch.device(device)
    torch.manual_seed(0)
    model = JRCLNet(ModelConfig(**SMALL), classes).to(device, torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    engine = LocalEngine(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), 1, 0.0)
    counts = np.linspace(60, 2, classes).astype(int)
    objective = JRCLObjective(LossConfig(backend="triton"), counts, np.arange(classes) < 3, device)
    handed_over = []
    model.register_forward_hook(lambda _module, _inputs, out: handed_over.append(out.logits))
    spy = LaunchSpy(ce_bdc._ce_bdc_kernel)
    monkeypatch.setattr(ce_bdc, "_ce_bdc_kernel", spy)
    build, builds = ce_bdc._build_class_groups, []
    monkeypatch.setattr(ce_bdc, "_last_groups", None)
    monkeypatch.setattr(ce_bdc, "_build_class_groups", lambda mask, block: builds.append(block) or build(mask, block))

    batch = 6
    for step in range(3):
        images = torch.randn(batch, 2, 3, 8, 8)
        terms = train_step(engine, objective, images, torch.arange(batch) % classes, device)
        assert all(torch.isfinite(v) for v in terms.values()), (step, terms)
    assert len(spy.launches) == 3 and len(builds) == 1
    for launch, logits in zip(spy.launches, handed_over):
        z, dz = launch["z_ptr"], launch["dz_ptr"]
        assert z.dtype == dz.dtype == torch.bfloat16
        # the classifier term reads view 0's rows of the model's logits: the same memory
        assert z.data_ptr() == logits.data_ptr() and z.shape == (batch, classes)
        assert z.stride(0) == launch["stride_z"] == 16 and dz.stride(0) == launch["stride_dz"] == 16
