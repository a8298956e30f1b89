"""Backbone plus the four JRCL heads: classifier, projection, binary, prototypes.

Backbones are entries of the BACKBONES registry: a builder (small_input_stem, norm) ->
(module without classifier, feature width). The torchvision ResNets register here;
other modules of models/ register their own (resnet_cifar.py: ResNet-32).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from jrcl_fast.config import ModelConfig
from jrcl_fast.errors import UserError
from jrcl_fast.registry import BACKBONES

# Revisions of the network a config builds. Every checkpoint records the revision it was
# trained with (none before revision 2); each change names the configs it affects, so that
# older checkpoints of unaffected configs still load and affected ones are refused.
ARCHITECTURE_CHANGES: dict[int, tuple[str, Callable[[ModelConfig], bool]]] = {
    2: ("model.norm=group gained weight-standardised convolutions, half-scale features and a "
        "LayerNorm projection head", lambda cfg: cfg.norm == "group"),
    3: ("model.norm=group gained 64-group norms and per-image standardised pooled features",
        lambda cfg: cfg.norm == "group"),
}
ARCHITECTURE_REVISION = max(ARCHITECTURE_CHANGES)


class JRCLOutput(NamedTuple):
    logits: Tensor  # N x C, a view of rows padded to a multiple of LOGIT_ROW_ALIGNMENT classes
    binary_logits: Tensor  # N x 2: column 0 normal, column 1 abnormal
    features: Tensor  # N x D, L2-normalised projections for the contrastive loss


def norm_layer(norm: str) -> Callable[[int], nn.Module]:
    """Normalisation of `channels` features: BatchNorm (sync_batch is converted to
    SyncBatchNorm by the trainer once ranks exist) or 64-group GroupNorm (fewer groups
    learn digits-lt's few-shot classes worse: docs/RESULTS.md)."""
    if norm == "group":
        return lambda channels: nn.GroupNorm(math.gcd(64, channels), channels)
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


class StandardizedFeatures(nn.Module):
    """Each image's features standardised over their channels (a LayerNorm without
    parameters), then multiplied by a constant; no parameters."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:]) * self.factor


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
    half scale quarters that curvature, to below batch norm's. Standardising each image's
    features over their channels first removes their common positive offset (they follow
    a ReLU). With 64-group norms: 79.9% balanced on digits-lt over 5 seeds, against 74.3%
    before (docs/RESULTS.md).
    """
    return StandardizedFeatures(0.5) if norm == "group" else nn.Identity()


def torchvision_backbone(name: str, small_input_stem: bool, norm: str) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its classifier, and its feature width.

    Weights start random: nothing is downloaded at run time. With GroupNorm the backbone
    follows a recipe that trains at batch norm's learning rate (measured in
    docs/RESULTS.md): weight-standardised convolutions, each residual branch's last norm
    starting at zero (every block starts as the identity), and per-image standardised,
    half-scale features.
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


# One literal name per line: the registry reads the names from this source (registry.py).
BACKBONES.register("resnet18", functools.partial(torchvision_backbone, "resnet18"))
BACKBONES.register("resnet50", functools.partial(torchvision_backbone, "resnet50"))
BACKBONES.register("resnet152", functools.partial(torchvision_backbone, "resnet152"))
BACKBONES.register("resnext50_32x4d", functools.partial(torchvision_backbone, "resnext50_32x4d"))


def imagenet_weights(name: str) -> dict[str, Tensor]:
    """torchvision's ImageNet weights of backbone `name`, read from the local torch cache
    only: a run never downloads (GPU nodes often have no network)."""
    try:
        url = torchvision.models.get_model_weights(name).DEFAULT.url
    except ValueError:
        raise UserError(f"model.pretrained: backbone {name} has no ImageNet weights in torchvision; "
                        "set model.pretrained=false or choose a torchvision ResNet") from None
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if not path.is_file():
        raise UserError(f"model.pretrained: {path} does not exist; download {url} on a machine with network "
                        "and put it there (TORCH_HOME moves the folder), or set model.pretrained=false")
    return torch.load(path, map_location="cpu", weights_only=True)


def build_backbone(name: str, small_input_stem: bool, norm: str = "batch",
                   pretrained: bool = False) -> tuple[nn.Module, int]:
    """The registered backbone `name` (model.backbone), and its feature width; with
    `pretrained`, every parameter and statistic from ImageNet except the classifier's
    (and the stem's, when small_input_stem replaces it)."""
    net, width = BACKBONES.get(name)(small_input_stem, norm)
    if pretrained:
        if norm != "batch":
            raise UserError(f"model.pretrained: the ImageNet weights were trained with batch norm, not "
                            f"model.norm={norm}; use model.norm=batch or model.pretrained=false")
        own = net.state_dict()
        loaded = {k: v for k, v in imagenet_weights(name).items() if k in own and v.shape == own[k].shape}
        unset = [k for k in own if k not in loaded and not (small_input_stem and k.startswith("conv1."))]
        if unset:  # never a silently random part of a "pretrained" network
            raise UserError(f"model.pretrained: the ImageNet weights of {name} lack {unset[0]} "
                            f"({len(unset)} tensors in all); the cached file does not match torchvision's {name}")
        net.load_state_dict(loaded, strict=False)
    return net, width


# Logit rows are padded to a multiple of this many classes: 16 bytes of bf16, so that the
# fused CE+BDC kernel loads and stores them in 128-bit vectors (docs/BENCHMARKS.md).
LOGIT_ROW_ALIGNMENT = 8


def class_logits(h: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """h @ weight.T + bias (N x C), as the first C columns of a product whose rows are
    padded to a multiple of LOGIT_ROW_ALIGNMENT classes: a view with an aligned row
    stride, which the losses read in place. The padding classes have zero weights and
    bias and are cut off, so values and gradients are those of the plain product; the
    parameters keep their shapes (and checkpoints load as before)."""
    pad = -weight.shape[0] % LOGIT_ROW_ALIGNMENT
    if pad:
        weight = F.pad(weight, (0, 0, 0, pad))
        bias = None if bias is None else F.pad(bias, (0, pad))
    return F.linear(h, weight, bias)[:, : weight.shape[0] - pad]


class AlignedLinear(nn.Linear):
    """nn.Linear, same parameters, with its logits from class_logits."""

    def forward(self, h: Tensor) -> Tensor:
        return class_logits(h, self.weight, self.bias)


class CosineClassifier(nn.Module):
    """Logits scale * cos(h, w_c): every class's weight enters at unit norm."""

    def __init__(self, width: int, num_classes: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, width))
        self.scale = scale

    def forward(self, h: Tensor) -> Tensor:
        # The scale goes on the features: a product with the logits' view would be a
        # contiguous copy, without the padded rows.
        return class_logits(self.scale * F.normalize(h, dim=1), F.normalize(self.weight, dim=1))


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int, norm: str) -> nn.Sequential:
    """Linear, norm, ReLU, linear: the projection head, and the prototype head."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        # Per sample for norm=group, like the backbone: LayerNorm over the hidden layer
        # (74.7% balanced on digits-lt over 3 seeds, against 73.5% with 32-group GN,
        # which normalises each image over 8 values; docs/RESULTS.md).
        nn.LayerNorm(hidden_dim) if norm == "group" else nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


class JRCLNet(nn.Module):
    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        self.backbone, width = build_backbone(cfg.backbone, cfg.small_input_stem, cfg.norm, cfg.pretrained)
        self.classifier = (AlignedLinear(width, num_classes) if cfg.classifier == "linear"
                           else CosineClassifier(width, num_classes, cfg.cosine_scale))
        self.binary_head = nn.Linear(width, 2)
        self.projection = mlp_head(width, cfg.projection_hidden_dim, cfg.projection_dim, cfg.norm)
        self.prototypes_from = cfg.prototypes
        if cfg.prototypes == "free":
            self.prototypes = nn.Parameter(torch.randn(num_classes, cfg.projection_dim))
        else:  # one row per class of the classifier's weights, mapped like the features
            self.prototype_head = mlp_head(width, cfg.projection_hidden_dim, cfg.projection_dim, cfg.norm)

    @classmethod
    def to_load(cls, cfg: ModelConfig, num_classes: int) -> JRCLNet:
        """The network of `cfg`, to load trained weights into: it never reads the ImageNet
        file of model.pretrained, which the weights replace anyway."""
        return cls(dataclasses.replace(cfg, pretrained=False), num_classes)

    def sync_batch_norms(self) -> None:
        """BatchNorm -> SyncBatchNorm where the statistics are over a rank's images (the
        backbone and the projection head), for model.norm=sync_batch. The prototype head
        normalises over the classifier's rows, the same on every rank: it keeps plain
        BatchNorm and costs no collective."""
        self.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(self.backbone)
        self.projection = nn.SyncBatchNorm.convert_sync_batchnorm(self.projection)

    def normalized_prototypes(self) -> Tensor:
        if self.prototypes_from == "free":
            return F.normalize(self.prototypes, dim=1)
        return F.normalize(self.prototype_head(self.classifier.weight), dim=1)

    def forward(self, images: Tensor) -> JRCLOutput:
        h = self.backbone(images)
        return JRCLOutput(self.classifier(h), self.binary_head(h), F.normalize(self.projection(h), dim=1))


def check_architecture(saved_revision: int | None, cfg: ModelConfig, source: str) -> None:
    """Refuse weights whose network this version builds differently for `cfg` (a
    checkpoint without a revision predates revision 2)."""
    revision = saved_revision or 1
    if revision > ARCHITECTURE_REVISION:
        raise UserError(f"{source} was written by a newer jrcl-fast (network revision {revision}, this one builds "
                        f"{ARCHITECTURE_REVISION}); upgrade jrcl-fast to load it")
    for later in range(revision + 1, ARCHITECTURE_REVISION + 1):
        change, affects = ARCHITECTURE_CHANGES[later]
        if affects(cfg):
            raise UserError(f"{source} was trained with network revision {revision}, and since then {change}; "
                            "train it again, or evaluate it with the jrcl-fast version that trained it")
