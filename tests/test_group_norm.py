"""model.norm=group: the GroupNorm model learns digits-lt, and the batch-norm model is untouched."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import run_cli, tiny_config
from torch import nn

from jrcl_fast.config import ModelConfig
from jrcl_fast.models import JRCLNet
from jrcl_fast.models.jrcl_net import StandardizedConv2d


def test_standardized_conv_matches_float64_reference():
    torch.manual_seed(torch.seed() % 2**31)
    conv = StandardizedConv2d(5, 7, kernel_size=3, stride=2, padding=1, bias=True)
    nn.init.normal_(conv.weight, mean=0.3, std=2.0)  # far from standardised already
    x = torch.randn(4, 5, 9, 9)
    w = conv.weight.detach().double()
    flat = w.flatten(1)
    mean = flat.mean(1)[:, None, None, None]
    var = ((flat - flat.mean(1, keepdim=True)) ** 2).mean(1)[:, None, None, None]
    expected = F.conv2d(x.double(), (w - mean) / torch.sqrt(var + conv.eps), conv.bias.detach().double(),
                        stride=2, padding=1)
    torch.testing.assert_close(conv(x).double(), expected, rtol=1e-4, atol=1e-4)


def test_group_norm_backbone_recipe():
    model = JRCLNet(ModelConfig(backbone="resnet18", small_input_stem=True, norm="group"), 10)
    convs = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is StandardizedConv2d for m in convs)
    # Every residual block starts as the identity (zero-initialised last norm of the branch).
    blocks = [m for m in model.backbone.modules() if isinstance(m, torchvision.models.resnet.BasicBlock)]
    identity_blocks = [block for block in blocks if block.downsample is None]
    assert identity_blocks
    for block in identity_blocks:
        x = torch.randn(2, block.conv1.in_channels, 4, 4)
        with torch.no_grad():
            torch.testing.assert_close(block(x), torch.relu(x))


def test_group_norm_model_is_per_sample():
    """What makes 2 ranks x 16 equal 1 rank x 32: no output depends on the rest of the batch."""
    model = JRCLNet(ModelConfig(backbone="resnet18", small_input_stem=True, projection_dim=16,
                                projection_hidden_dim=32, norm="group"), 10).train()
    images = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        whole, halves = model(images), [model(images[:3]), model(images[3:])]
    for field, got in zip(whole._fields, whole):
        torch.testing.assert_close(got, torch.cat([getattr(half, field) for half in halves]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["batch", "sync_batch"])
def test_batch_norm_backbone_is_plain_torchvision(norm):
    """The GroupNorm recipe must not leak into the batch-norm model (the Quick start's default)."""
    torch.manual_seed(0)
    model = JRCLNet(ModelConfig(backbone="resnet18", small_input_stem=True, norm=norm), 10)
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    reference.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    reference.maxpool, reference.fc = nn.Identity(), nn.Identity()
    assert not any(isinstance(m, StandardizedConv2d) for m in model.modules())
    ours, theirs = model.backbone.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.slow
def test_group_norm_digits_lt_learns(tmp_path, digits_root):
    """Before the GroupNorm recipe, lr 0.05 made the heads diverge in warm-up and every
    image ended in class 0 (CE at the prior's entropy)."""
    config = tiny_config(tmp_path, digits_root, model={"norm": "group"}, train={"epochs": 5, "engine": "local"})
    done = run_cli("train", "--config", str(config))
    assert done.returncode == 0, done.stderr
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    counts = [row["train_count"] for row in results["per_class"]]
    prior_entropy = -sum(c / sum(counts) * math.log(c / sum(counts)) for c in counts)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    # A model that predicts the prior has CE = its entropy (the collapsed run: 1.72 vs 1.74).
    assert last["loss_ce"] < 0.8 * prior_entropy
    learnt = [row["class"] for row in results["per_class"] if row["accuracy"] > 0.25]
    assert len(learnt) >= 3, results["per_class"]  # collapsed: only class 0
