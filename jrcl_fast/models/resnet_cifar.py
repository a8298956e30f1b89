"""ResNet-32 for ~32 px inputs (He et al. 2016, section 4.2), the backbone of the
long-tail literature at CIFAR scale (LDAM, Cao et al. 2019; BCL, Zhu et al. 2022).

3 stages of 5 basic blocks with 16, 32 and 64 channels; a 3x3 stride-1 stem (so
model.small_input_stem changes nothing); the shortcut that halves the resolution
subsamples and zero-pads the channels (option A), so it has no parameters: about
0.46 M in all. model.norm applies as to the torchvision backbones (jrcl_net.py):
batch (sync_batch is converted by the trainer) or the GroupNorm recipe, weight-
standardised convolutions and standardised half-scale features, but without zero-initialised
residual branches: with parameter-free shortcuts that would start the network as its
16-channel stem, 48 of its 64 features exactly zero, and it then barely learns
(tests/test_resnet_cifar.py, test_a_few_steps_fit_a_batch[group], fails with it).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from jrcl_fast.models.jrcl_net import feature_head, norm_layer, standardize_convs
from jrcl_fast.registry import BACKBONES

STAGE_WIDTHS = (16, 32, 64)
BLOCKS_PER_STAGE = 5  # depth 6 * 5 + 2 = 32


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str):
        super().__init__()
        make_norm = norm_layer(norm)
        self.conv1, self.bn1 = conv3x3(in_channels, out_channels, stride), make_norm(out_channels)
        self.conv2, self.bn2 = conv3x3(out_channels, out_channels), make_norm(out_channels)
        self.stride, self.pad = stride, out_channels - in_channels

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetCifar(nn.Module):
    def __init__(self, norm: str, blocks_per_stage: int = BLOCKS_PER_STAGE):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(3, STAGE_WIDTHS[0]), norm_layer(norm)(STAGE_WIDTHS[0])
        blocks, channels = [], STAGE_WIDTHS[0]
        for stage, width in enumerate(STAGE_WIDTHS):
            for k in range(blocks_per_stage):
                blocks.append(BasicBlock(channels, width, 2 if stage > 0 and k == 0 else 1, norm))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = feature_head(norm)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if norm == "group":
            standardize_convs(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet32(small_input_stem: bool, norm: str) -> tuple[nn.Module, int]:
    return ResNetCifar(norm), STAGE_WIDTHS[-1]


BACKBONES.register("resnet32", resnet32)
