"""Backbone plus the four JRCL heads: classifier, projection, binary, prototypes.

Backbones are entries of the BACKBONES registry: a builder (small_input_stem, norm) ->
(module without classifier, feature width). The torchvision ResNets register here;
other modules of models/ register their own (resnet_cifar.py: ResNet-32).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from jrcl_fast.config import ModelConfig
from jrcl_fast.registry import BACKBONES


class JRCLOutput(NamedTuple):
    logits: Tensor  # N x C
    binary_logits: Tensor  # N x 2: column 0 normal, column 1 abnormal
    features: Tensor  # N x D, L2-normalised projections for the contrastive loss


def norm_layer(norm: str) -> Callable[[int], nn.Module]:
    """Normalisation of `channels` features: BatchNorm (sync_batch is converted to
    SyncBatchNorm by the trainer once ranks exist) or 32-group GroupNorm."""
    if norm == "group":
        return lambda channels: nn.GroupNorm(math.gcd(32, channels), channels)
    return nn.BatchNorm2d


class StandardizedConv2d(nn.Conv2d):
    """Conv2d whose filters are standardised to zero mean and unit variance over their
    fan-in at every forward: Weight Standardization (Qiao et al. 2019), GroupNorm's partner
    in BiT (Kolesnikov et al. 2020). Without batch statistics nothing else centres the
    channels, and the features of different images start nearly parallel."""

    eps = 1e-10

    def forward(self, x: Tensor) -> Tensor:
        # In fp32 whatever the weights' dtype: a bf16 variance of ~1e-3 keeps 3 digits.
        w = self.weight.float()
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return self._conv_forward(x, ((w - mean) / torch.sqrt(var + self.eps)).to(x.dtype), self.bias)


class FeatureScale(nn.Module):
    """Multiplies its input by a constant; no parameters."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor


def standardize_convs(module: nn.Module) -> None:
    """Replace every nn.Conv2d under `module` by a StandardizedConv2d holding the same parameters."""
    for name, child in module.named_children():
        if type(child) is nn.Conv2d:
            standardized = StandardizedConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                              child.padding, child.dilation, child.groups, child.bias is not None,
                                              child.padding_mode, device=child.weight.device,
                                              dtype=child.weight.dtype)
            standardized.weight, standardized.bias = child.weight, child.bias
            setattr(module, name, standardized)
        else:
            standardize_convs(child)


def feature_head(norm: str) -> nn.Module:
    """What follows a backbone's pooled features.

    GroupNorm features are not centred across images: their batch mean holds most of
    their energy, and the linear heads' curvature along it grows with its square norm.
    At full scale SGD at lr 0.05 diverges in the heads alone (even on a frozen backbone);
    half scale quarters that curvature, to below batch norm's.
    """
    return FeatureScale(0.5) if norm == "group" else nn.Identity()


def torchvision_backbone(name: str, small_input_stem: bool, norm: str) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its classifier, and its feature width.

    Weights start random: nothing is downloaded at run time. With GroupNorm the backbone
    follows a recipe that trains at batch norm's learning rate (measured in
    docs/RESULTS.md): weight-standardised convolutions, each residual branch's last norm
    starting at zero (every block starts as the identity), and half-scale features.
    """
    group = norm == "group"
    net = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer(norm), zero_init_residual=group)
    if small_input_stem:
        # For ~32 px inputs the 7x7/2 stem and max-pool would leave 1 x 1 maps.
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    if group:
        standardize_convs(net)
    width = net.fc.in_features
    net.fc = feature_head(norm)
    return net, width


for _name in ("resnet18", "resnet50", "resnet152", "resnext50_32x4d"):
    BACKBONES.register(_name, functools.partial(torchvision_backbone, _name))


def build_backbone(name: str, small_input_stem: bool, norm: str = "batch") -> tuple[nn.Module, int]:
    """The registered backbone `name` (model.backbone), and its feature width."""
    return BACKBONES.get(name)(small_input_stem, norm)


class JRCLNet(nn.Module):
    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        self.backbone, width = build_backbone(cfg.backbone, cfg.small_input_stem, cfg.norm)
        self.classifier = nn.Linear(width, num_classes)
        self.binary_head = nn.Linear(width, 2)
        self.projection = nn.Sequential(
            nn.Linear(width, cfg.projection_hidden_dim),
            # Per sample for norm=group, like the backbone: LayerNorm over the hidden layer
            # (74.7% balanced on digits-lt over 3 seeds, against 73.5% with 32-group GN,
            # which normalises each image over 8 values; docs/RESULTS.md).
            nn.LayerNorm(cfg.projection_hidden_dim) if cfg.norm == "group"
            else nn.BatchNorm1d(cfg.projection_hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.projection_hidden_dim, cfg.projection_dim),
        )
        self.prototypes = nn.Parameter(torch.randn(num_classes, cfg.projection_dim))

    def normalized_prototypes(self) -> Tensor:
        return F.normalize(self.prototypes, dim=1)

    def forward(self, images: Tensor) -> JRCLOutput:
        h = self.backbone(images)
        return JRCLOutput(self.classifier(h), self.binary_head(h), F.normalize(self.projection(h), dim=1))
