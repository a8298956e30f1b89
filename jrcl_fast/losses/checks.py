"""Argument checks of the public loss functions, run once per call at that boundary
(the references and kernels behind it trust their arguments).

A wrong shape or a label out of range would otherwise surface as an index error deep
inside a kernel, or worse as a silently wrong loss, so each is one ValueError that
names the argument and what was expected.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

# Reading a value of a CUDA tensor makes the host wait for the device, every step, and
# on the CPU it costs a pass over the tensor. So the value checks (finite, label range,
# normal mask, anchors among the keys) run only when JRCL_CHECK_VALUES=1, a debug
# switch; shape, dtype and choice checks always run. Without them a diverging run is
# still caught: the trainer checks the loss, which non-finite outputs make non-finite,
# labels were checked against the classes when the data set was loaded, and the CE+BDC
# kernel turns a label out of range into a NaN loss.
CHECK_VALUES = os.environ.get("JRCL_CHECK_VALUES", "0") == "1"


class NonFiniteError(ValueError):
    """An input holds NaN or infinity: in training, the sign of a diverged run."""


def check_matrix(name: str, x: Tensor, rows: int | None = None, cols: int | None = None) -> None:
    if x.dim() != 2 or (rows is not None and x.shape[0] != rows) or (cols is not None and x.shape[1] != cols):
        want = f"{rows if rows is not None else 'N'} x {cols if cols is not None else 'D'}"
        raise ValueError(f"{name} must be a {want} matrix, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if CHECK_VALUES and not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"{name} contains NaN or infinite values")


def check_labels(name: str, labels: Tensor, length: int, num_classes: int | None) -> None:
    if labels.dim() != 1 or labels.shape[0] != length:
        raise ValueError(f"{name} must be a vector of length {length}, got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {labels.dtype}")
    if length and CHECK_VALUES:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or (num_classes is not None and high >= num_classes):
            upper = f"{num_classes}" if num_classes is not None else "inf"
            raise ValueError(f"{name} must lie in [0, {upper}), got values from {low} to {high}")


def check_normal_mask(normal_mask: Tensor, num_classes: int) -> None:
    if normal_mask.dtype != torch.bool or normal_mask.shape != (num_classes,):
        raise ValueError(
            f"normal_mask must be a boolean vector of length C = {num_classes}, "
            f"got {normal_mask.dtype} of shape {tuple(normal_mask.shape)}"
        )
    if CHECK_VALUES and (bool(normal_mask.all()) or not bool(normal_mask.any())):
        raise ValueError("normal_mask must mark at least one normal and one abnormal class, got all "
                         f"{'True' if bool(normal_mask.all()) else 'False'}")


def check_o2a_args(
    anchors: Tensor,
    anchor_labels: Tensor,
    temperature: float,
    prototypes: Tensor | None = None,
    keys: Tensor | None = None,
    key_labels: Tensor | None = None,
    anchor_offset: int = 0,
    names: tuple[str, str] = ("features", "labels"),
) -> None:
    """The checks of the O2A entry points, run once, before anything is concatenated or
    gathered. `names` are what the caller calls the anchors and their labels. With
    `prototypes` (C x D) the labels must lie in [0, C); the split form passes its key
    set instead, of which the anchors must be rows `anchor_offset ..`."""
    anchor_name, label_name = names
    check_matrix(anchor_name, anchors)
    n, dim = anchors.shape
    num_classes = None
    if prototypes is not None:
        check_matrix("prototypes", prototypes, cols=dim)
        num_classes = prototypes.shape[0]
    check_labels(label_name, anchor_labels, n, num_classes)
    if keys is not None:
        check_matrix("keys", keys, cols=dim)
        if keys.dtype != anchors.dtype:
            raise ValueError(f"keys must have the dtype of {anchor_name}, {anchors.dtype}, got {keys.dtype}")
        check_labels("key_labels", key_labels, keys.shape[0], None)
        # The self-exclusion trusts that anchor i is key anchor_offset + i.
        rows = slice(anchor_offset, anchor_offset + n)
        in_range = 0 <= anchor_offset <= keys.shape[0] - n
        if not in_range or (CHECK_VALUES and not (torch.equal(keys[rows], anchors)
                                                         and torch.equal(key_labels[rows], anchor_labels))):
            raise ValueError(f"{anchor_name} must be rows {anchor_offset}..{anchor_offset + n - 1} of keys, with the "
                             f"same labels; pass their position in the {keys.shape[0]} keys as anchor_offset")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
