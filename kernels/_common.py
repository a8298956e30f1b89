"""Helpers shared by the fused loss kernels: dtype policy, output allocation, the end of a
streaming log-sum-exp and a flush-to-zero exp2."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)



def interpreter_enabled() -> bool:
    """Whether TRITON_INTERPRET asks for the Triton interpreter, by Triton's own rule
    (its knob, read as @triton.jit reads it: 1, true, on and, from Triton 3.8, yes, in any
    case). The one reading of the variable in the package: cli.py asks here too."""
    return bool(triton.knobs.runtime.interpret)


# Whether @triton.jit builds interpreted functions (decided at import, as here).
INTERPRETED = interpreter_enabled()
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

