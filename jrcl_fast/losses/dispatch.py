"""Choose the implementation of a loss: the PyTorch reference or the fused Triton kernel.

As Cut Cross-Entropy selects its implementation by an enum, each loss registers its two
implementations under one argument bundle (`jrcl_fast.kernels.specs`), so the public
function builds the bundle once and hands it to whichever `Impl` runs.
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from jrcl_fast.config import LOSS_BACKENDS
from jrcl_fast.losses.checks import check_choice

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Impl(enum.Enum):
    TORCH = "torch"  # the reference, the executable specification
    TRITON = "triton"  # the fused kernels


# module:function of each loss's implementations. The kernels are imported on first use:
# importing Triton is slow, and TRITON_INTERPRET must be set before.
IMPLEMENTATIONS: dict[str, dict[Impl, str]] = {
    "o2a": {Impl.TORCH: "jrcl_fast.losses.reference:o2a_per_anchor_reference",
            Impl.TRITON: "jrcl_fast.kernels.o2a:fused_o2a_per_anchor"},
    "ce_bdc": {Impl.TORCH: "jrcl_fast.losses.reference:ce_bdc_reference",
               Impl.TRITON: "jrcl_fast.kernels.ce_bdc:fused_ce_bdc"},
}


def select_impl(backend: str | Impl, *tensors: Tensor) -> Impl:
    """An Impl as given, or the `loss.backend` value as one: `auto` takes the kernels
    when every tensor is on a CUDA device in a dtype they accumulate exactly (float64
    stays on the reference) and the reference otherwise; `torch` and `triton` force one
    (`triton` on CPU tensors needs TRITON_INTERPRET=1, set before the kernels are
    imported)."""
    if isinstance(backend, Impl):
        return backend
    check_choice("backend", backend, LOSS_BACKENDS)
    if backend == "auto":
        return Impl.TRITON if all(t.is_cuda and t.dtype in KERNEL_DTYPES for t in tensors) else Impl.TORCH
    return Impl(backend)


def implementation(loss: str, impl: Impl) -> Callable[[Any], Any]:
    """The function that computes `loss` ("o2a" or "ce_bdc") with `impl`, taking that
    loss's argument bundle."""
    module, name = IMPLEMENTATIONS[loss][impl].split(":")
    return getattr(importlib.import_module(module), name)


def load_implementations(backend: str, device: torch.device) -> str:
    """Import now the implementations `backend` takes on `device` (Triton's import is
    slow: better in a start-up phase than inside step 1) and say which they are."""
    impl = select_impl(backend, torch.empty(0, device=device))
    for loss in IMPLEMENTATIONS:
        implementation(loss, impl)
    if impl is Impl.TORCH:
        return f"PyTorch reference losses (loss.backend={backend})"
    where = ", Triton interpreter" if device.type == "cpu" else ""
    return f"fused Triton kernels (loss.backend={backend}{where})"
