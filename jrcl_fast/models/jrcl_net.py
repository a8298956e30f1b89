"""Backbone plus the four JRCL heads: classifier, projection, binary, prototypes."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from jrcl_fast.config import ModelConfig


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


def build_backbone(name: str, small_input_stem: bool, norm: str = "batch") -> tuple[nn.Module, int]:
    """A torchvision backbone without its classifier, and its feature width.

    Weights start random: nothing is downloaded at run time.
    """
    net = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer(norm))
    if small_input_stem:
        # For ~32 px inputs the 7x7/2 stem and max-pool would leave 1 x 1 maps.
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    width = net.fc.in_features
    net.fc = nn.Identity()
    return net, width


class JRCLNet(nn.Module):
    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        self.backbone, width = build_backbone(cfg.backbone, cfg.small_input_stem, cfg.norm)
        self.classifier = nn.Linear(width, num_classes)
        self.binary_head = nn.Linear(width, 2)
        self.projection = nn.Sequential(
            nn.Linear(width, cfg.projection_hidden_dim),
            nn.GroupNorm(math.gcd(32, cfg.projection_hidden_dim), cfg.projection_hidden_dim)
            if cfg.norm == "group" else nn.BatchNorm1d(cfg.projection_hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.projection_hidden_dim, cfg.projection_dim),
        )
        self.prototypes = nn.Parameter(torch.randn(num_classes, cfg.projection_dim))

    def normalized_prototypes(self) -> Tensor:
        return F.normalize(self.prototypes, dim=1)

    def forward(self, images: Tensor) -> JRCLOutput:
        h = self.backbone(images)
        return JRCLOutput(self.classifier(h), self.binary_head(h), F.normalize(self.projection(h), dim=1))
