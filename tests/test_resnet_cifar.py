"""ResNet-32 (models/resnet_cifar.py): registered, CIFAR-sized, and model.norm applies
as to the torchvision backbones."""

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from jrcl_fast.config import ModelConfig
from jrcl_fast.models import JRCLNet
from jrcl_fast.models.jrcl_net import StandardizedConv2d, StandardizedFeatures
from jrcl_fast.registry import BACKBONES


def expected_parameters(widths=(16, 32, 64), blocks=5) -> int:
    """He et al.'s CIFAR ResNet counted by hand: 3x3 convs without bias, 2 parameters per
    channel per norm layer, option-A shortcuts without parameters."""
    total, channels = 3 * widths[0] * 9 + 2 * widths[0], widths[0]
    for width in widths:
        for _ in range(blocks):
            total += channels * width * 9 + width * width * 9 + 2 * (2 * width)
            channels = width
    return total


@pytest.mark.parametrize("norm", ["batch", "sync_batch", "group"])
@pytest.mark.parametrize("size", [28, 32])
def test_shapes_and_parameter_count(norm, size):
    backbone, width = BACKBONES.get("resnet32")(False, norm)
    count = sum(p.numel() for p in backbone.parameters())
    assert width == 64 and count == expected_parameters() and 0.45e6 < count < 0.47e6  # the literature's 0.46 M
    model = JRCLNet(ModelConfig(backbone="resnet32", projection_dim=16, projection_hidden_dim=32, norm=norm), 7)
    out = model.eval()(torch.randn(3, 3, size, size))
    assert out.logits.shape == (3, 7) and out.binary_logits.shape == (3, 2) and out.features.shape == (3, 16)


def test_batch_norm_variants_use_plain_convs_and_convert_to_sync_batch_norm():
    backbone, _ = BACKBONES.get("resnet32")(False, "sync_batch")
    assert not any(isinstance(m, (StandardizedConv2d, StandardizedFeatures)) for m in backbone.modules())
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
    assert norms == 31 and sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) == norms


def test_group_norm_recipe_and_per_sample():
    torch.manual_seed(torch.seed() % 2**31)
    backbone, _ = BACKBONES.get("resnet32")(False, "group")
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 31 and all(type(m) is StandardizedConv2d for m in convs)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.train().modules())
    assert isinstance(backbone.fc, StandardizedFeatures) and backbone.fc.factor == 0.5
    pooled = torch.rand(5, 64) * 3 + 1  # positive, as after a ReLU
    features = backbone.fc(pooled)  # per image: mean 0, standard deviation 0.5
    torch.testing.assert_close(features.mean(1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(features.std(1, unbiased=False), torch.full((5,), 0.5), atol=1e-4, rtol=0)
    images = torch.randn(6, 3, 28, 28)
    with torch.no_grad():  # no output depends on the rest of the batch
        torch.testing.assert_close(backbone(images), torch.cat([backbone(images[:3]), backbone(images[3:])]),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_a_few_steps_fit_a_batch(norm):
    """25 SGD steps on 16 real digits (upsampled to 16 px) at the digits-lt learning rate."""
    digits = load_digits()
    images = torch.tensor(digits.images[:16], dtype=torch.float32)[:, None].repeat(1, 3, 1, 1) / 16
    images = (F.interpolate(images, size=16, mode="bilinear") - 0.5) / 0.25
    labels = torch.as_tensor(digits.target[:16])
    torch.manual_seed(torch.seed() % 2**31)
    backbone, width = BACKBONES.get("resnet32")(False, norm)
    model = nn.Sequential(backbone, nn.Linear(width, 10)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(map(math.isfinite, losses)) and losses[-1] < 0.5 * losses[0], losses
