"""Choose between the PyTorch reference and the fused Triton kernels."""

from __future__ import annotations

import torch
from torch import Tensor

from jrcl_fast.config import LOSS_BACKENDS
from jrcl_fast.losses.checks import check_choice

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def use_kernels(backend: str, *tensors: Tensor) -> bool:
    """`auto` takes the kernels when every tensor is on a CUDA device in a dtype they
    accumulate exactly (float64 stays on the reference) and the reference otherwise;
    `torch` and `triton` force one path (`triton` on CPU tensors needs
    TRITON_INTERPRET=1, set before the kernels are imported)."""
    check_choice("backend", backend, LOSS_BACKENDS)
    if backend == "auto":
        return all(t.is_cuda and t.dtype in KERNEL_DTYPES for t in tensors)
    return backend == "triton"
