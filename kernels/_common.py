"""Helpers shared by the fused loss kernels: dtype policy, output allocation, online LSE."""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Whether @triton.jit builds interpreted functions (decided at import, as here).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INTERPRETED: tl.constexpr = tl.constexpr(INTERPRETED)
LOG2E: tl.constexpr = tl.constexpr(1.0 / math.log(2.0))


def check_kernel_dtype(name: str, x: Tensor) -> None:
    """The kernels accumulate in float32, so float64 inputs would be silently
    downgraded: refuse them (the PyTorch reference serves float64)."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: the fused kernels take float32, float16 or bfloat16, got {x.dtype}")


# Test hook: when set, output buffers start as NaN (integers as their minimum value),
# so a test comparing the results proves the kernels wrote every element.
POISON_OUTPUTS = False


def new_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Allocation of every buffer a kernel must fully overwrite."""
    if not POISON_OUTPUTS:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
    return torch.full(shape, fill, dtype=dtype, device=device)


@triton.jit
def online_lse_rescale(m, s, block_max):
    """One step of a streaming log-sum-exp: returns the new running max, the finite
    reference to subtract before exponentiating this block, and the old sum rescaled
    to it. The reference is 0 while everything seen is -inf (an all-masked block),
    which keeps exp(-inf - -inf) = NaN out of the sum."""
    m_new = tl.maximum(m, block_max)
    m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
    return m_new, m_ref, s * tl.exp(m - m_ref)


@triton.jit
def finish_lse(m, s):
    """Log-sum-exp from the running max and sum; -inf when nothing unmasked was seen.
    The sum is then 0: taking the log of 1 instead gives the same -inf + 0 = -inf
    without log(0), on which the interpreter's numpy warns (runs once, after the loop)."""
    return m + tl.log(tl.where(m == -float("inf"), 1.0, s))


@triton.jit
def fast_exp2(x):
    """2^x with subnormal results flushed to 0 (ex2.approx.ftz): tl.exp2 compiles to
    the same MUFU.EX2 plus a range fix-up of three instructions that only matters for
    results below 2^-126, negligible against the sums and gradients here. The
    interpreter runs no PTX: it takes tl.exp2."""
    if _INTERPRETED:
        return tl.exp2(x)
    else:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )


@triton.jit
def fast_exp(x):
    """e^x as fast_exp2 computes it."""
    return fast_exp2(x * LOG2E)
