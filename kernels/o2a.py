"""Fused One-to-All contrastive loss: Triton forward/backward and its autograd Function.

Same contract and arguments (`specs.O2AArgs`) as
`jrcl_fast.losses.reference.o2a_per_anchor_reference`. The loss of
anchor i is log_den_i - pos_mean_i. The n x M similarity matrix is never stored:

- log_den_i, the class-weighted log-sum-exp over every key but the anchor itself, is
  the kernels' work. The forward streams key blocks through a log-sum-exp in log2
  units (one fused multiply-add and one ex2 per similarity), with each key's log class
  weight precomputed once as a bias, taken against a fixed per-anchor bound of its
  similarities where that is safe (no running max to keep; see fixed_references) and
  online otherwise, and keeps O_i = sum_j p_ij k_j, which is
  the anchors' gradient up to a per-anchor factor; the backward recomputes each
  similarity tile once, over key blocks (gradient of the keys), so memory stays
  O((n + M) D). An anchor's own key is masked only in the tiles that hold it.
- pos_mean_i, the mean similarity to the anchor's positives, needs no tile at all:
  it is a_i . (S_c - a_i) / (tau |Pos(i)|) with S_c the sum of the keys of the
  anchor's class, O((n + M) D) in PyTorch, differentiated by autograd.

Class ids come from a sort of the key labels (each class's first position in it),
so nothing is sized from the data and the host never waits for the device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._common import INTERPRETED, LOG2E, check_kernel_dtype, fast_exp2, new_buffer
from .specs import O2AArgs

# Float32 dots: tf32x3 (error-compensated TF32 on the tensor cores, float32-level error)
# by default; "ieee" runs them on the FMA units. Half-precision inputs ignore this.
DOT_PRECISIONS = ("tf32x3", "ieee")

# Tiles per pass, (BLOCK_N, BLOCK_M, num_warps, num_stages), by the bytes of a D-wide
# row. The first of each list is the choice made with benchmarks/kernel_sass.py for
# sm_90 (fewest instructions per similarity without register spills): 64 x 64 tiles on
# one warpgroup (a row's max and sum never cross shared memory) for half-precision rows
# of at most 256 bytes; float32 and wider rows take smaller tiles on 8 warps, whose
# float32 accumulators would otherwise spill. It is all the interpreter runs. On a GPU,
# Triton times every tile of the list once per shape and variant and keeps the fastest.
# `kernel_sass.py --candidates` lists them: up to D = 128 (256 in half precision) the
# first tile spills nothing and the others at most a few bytes (float32 forwards sit at
# the 255-register limit); at float32 D = 256 the last tile, and tf32x3's keys' backward,
# spill more. Triton 3.6 (the GPU machines') spills in the pipelined float32 forward
# tiles: the unpipelined 32 x 64 tile (1 stage) is listed for it (docs/BENCHMARKS.md).
# Each tile also says whether the pass splits its loop at the diagonal (below).
TILES: dict[int, dict[str, list[tuple[int, int, int, int]]]] = {
    256: {"fwd": [(64, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 2), (64, 64, 4, 4), (64, 32, 4, 3)],
          "bwd_keys": [(64, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 2), (64, 64, 4, 4), (32, 64, 4, 3)]},
    512: {"fwd": [(32, 64, 8, 3), (32, 64, 8, 2), (16, 64, 4, 3), (32, 64, 8, 1)],
          "bwd_keys": [(32, 32, 8, 3), (32, 32, 8, 2), (16, 32, 4, 3), (16, 32, 8, 3)]},
    1 << 30: {"fwd": [(16, 16, 8, 2), (16, 16, 8, 1), (32, 32, 8, 3)],
              "bwd_keys": [(16, 16, 8, 3), (16, 16, 8, 1), (32, 32, 8, 3)]},
}


# Only the one or two blocks of the other side that hold an anchor's own key need the
# self mask. Rows of at most this many bytes (half precision up to D = 128, where
# training runs) loop over the blocks before and after them without it: 35.0 -> 30.9
# SASS instructions per similarity over both passes (Triton 3.8; 41.9 -> 40.2 with
# 3.6). Wider rows keep one masked loop: the split's two extra loops cost registers, and
# float32 tiles spill with them.
SPLIT_DIAGONAL_MAX_ROW_BYTES = 256

# The forward's exponents are t_ij - r_i with r_i = scale |a_i| max_j |k_j|, an upper bound
# of anchor i's weighted similarities t_ij (class weights are at most 1), instead of a
# running maximum: no row max, rescaling of the sums and of O, or wait for them per tile
# (SASS per similarity of the forward: 18.9 -> 15.3 with Triton 3.8, 26.4 -> 22.8 with
# 3.6). Every t_ij is at least r_i - gap_i, gap_i = 2 r_i + log2 M (weights are at least
# 1/M), so with gap_i <= this bound every term lies in [2^-100, 1]: no underflow or
# overflow in float32 or bfloat16 (float16 runs online, below). Anchors with a larger gap
# (long vectors, tiny temperatures) keep the online log-sum-exp, in a second launch, for
# their whole group of FIXED_REFERENCE_GROUP anchors: a multiple of every tile's BLOCK_N,
# so that each launch's blocks are all fixed or all online whichever tile it runs.
FIXED_REFERENCE_MAX_GAP = 100.0
FIXED_REFERENCE_GROUP = 128
# float16's P tile (the weights of O, in the inputs' dtype) flushes terms below 2^-24: its
# largest terms must stay near 1, so it always runs online and skips the fixed launch.
FIXED_REFERENCE_DTYPES = (torch.float32, torch.bfloat16)


def fixed_references(anchors: Tensor, keys: Tensor, scale: float) -> Tensor:
    """Each anchor's fixed log2 reference r_i (float32), +inf for every anchor of a group
    (FIXED_REFERENCE_GROUP rows) with one whose gap is too wide or whose vectors are not
    finite: the kernel runs those groups online. Norms in the inputs' precision: a bound
    rounded low lets a term reach a little above 1, which is harmless. All +inf outside
    FIXED_REFERENCE_DTYPES."""
    n = anchors.shape[0]
    if anchors.dtype not in FIXED_REFERENCE_DTYPES:
        return torch.full((n,), math.inf, device=anchors.device)
    key_norms = torch.linalg.vector_norm(keys, dim=1).float()
    longest_key = key_norms.max() if keys.shape[0] else key_norms.new_zeros(())
    bound = scale * torch.linalg.vector_norm(anchors, dim=1).float() * longest_key
    too_wide = ~(2 * bound + math.log2(max(keys.shape[0], 1)) <= FIXED_REFERENCE_MAX_GAP)  # NaN too
    group_too_wide = F.pad(too_wide, (0, -n % FIXED_REFERENCE_GROUP)).view(-1, FIXED_REFERENCE_GROUP).any(1)
    return torch.where(group_too_wide.repeat_interleave(FIXED_REFERENCE_GROUP)[:n], math.inf, bound)


def block_d(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _row_class_tiles(row_bytes: int, pass_name: str) -> list[dict[str, int]]:
    tiles = next(by_pass[pass_name] for limit, by_pass in TILES.items() if row_bytes <= limit)
    split = row_bytes <= SPLIT_DIAGONAL_MAX_ROW_BYTES
    return [{"BLOCK_N": bn, "BLOCK_M": bm, "SPLIT_DIAGONAL": split, "num_warps": warps, "num_stages": stages}
            for bn, bm, warps, stages in tiles]


def tile_candidates(dim: int, elem_size: int, pass_name: str) -> list[dict[str, int]]:
    """The tiles a pass may run with for D = `dim` in `elem_size`-byte elements; the
    first is the fixed choice."""
    # Float32 dots (tf32x3's split operands, IEEE's FMA accumulators) take more registers
    # than half-precision ones: at D = 64 the 256-byte tiles spill, the 512-byte ones do not.
    return _row_class_tiles(max(block_d(dim) * elem_size, 512 if elem_size == 4 else 0), pass_name)


PASSES = ("fwd", "bwd_keys")  # a training step: the forward (keeping O), the keys' backward

# Every tile of every list, as the autotuners' configurations.
GPU_CONFIGS = {
    pass_name: {
        tuple(tile.values()): triton.Config({"BLOCK_N": tile["BLOCK_N"], "BLOCK_M": tile["BLOCK_M"],
                                             "SPLIT_DIAGONAL": tile["SPLIT_DIAGONAL"]},
                                            num_warps=tile["num_warps"], num_stages=tile["num_stages"])
        for limit in TILES for tile in _row_class_tiles(limit, pass_name)
    }
    for pass_name in PASSES
}


def gpu_configs(pass_name: str, dim: int, elem_size: int) -> list[triton.Config]:
    """The configurations the GPU autotuner times for one launch, in tile_candidates' order."""
    return [GPU_CONFIGS[pass_name][tuple(t.values())] for t in tile_candidates(dim, elem_size, pass_name)]


def _autotuned(pass_name: str):
    """On a GPU, triton.autotune over the pass's tiles for each launch's row width. The
    interpreter has no timer (and Triton 3.6's autotuner times even a lone tile): there
    the kernel stays as it is, and each launch passes the first tile (launch_tile)."""
    if INTERPRETED:
        return lambda kernel: kernel
    # Tuned per shape and per variant: IEEE and tf32x3 dots, and a forward with or without
    # O, favour different tiles (the dtype is part of Triton's key anyway). The forward's
    # online launch takes the tile timed on its fixed-reference launch, which comes first
    # and in training has the work; float16 skips that launch and is timed online. (A
    # shape first met with every group online is timed on an empty launch: its tile is
    # then arbitrary, its result exact.)
    key = ["n", "M", "D", "DOT_PRECISION", "STORE_O"]
    return triton.autotune(list(GPU_CONFIGS[pass_name].values()), key=key, prune_configs_by={
        "early_config_prune": lambda _configs, nargs, **kwargs: _prune(pass_name, {**nargs, **kwargs})})


def _prune(pass_name: str, launch_args: dict[str, object]) -> list[triton.Config]:
    """The autotuner's candidates for one launch. Triton's autotuner hands the arguments
    passed by position as a dict and those passed by keyword (every one, at the launches
    here) as keywords: both are read."""
    return gpu_configs(pass_name, launch_args["D"], launch_args["a_ptr"].element_size())


def launch_tile(dim: int, elem_size: int, pass_name: str) -> dict[str, int]:
    """The tile arguments a launch passes: the autotuner's choice on a GPU, the first tile
    under the interpreter."""
    return tile_candidates(dim, elem_size, pass_name)[0] if INTERPRETED else {}


@triton.jit
def _load_anchor_block(a_ptr, ya_ptr, start, n, D, stride_a, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Anchor rows start.. (zero-padded) and their class ids (-1 on padding)."""
    rows = start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < n
    a = tl.load(a_ptr + rows[:, None] * stride_a + dims[None, :], mask=row_ok[:, None] & (dims < D)[None, :], other=0.0)
    ya = tl.load(ya_ptr + rows, mask=row_ok, other=-1)
    return rows, row_ok, a, ya


@triton.jit
def _load_key_block(
    k_ptr, yk_ptr, bias_other_ptr, bias_same_ptr, start, M, D, stride_k,
    CLASS_AVERAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Key rows start.. (zero-padded), their class ids and their log2 class weights:
    against an anchor of another class, and of the key's own class (which excludes the
    anchor). Padding gets weight 0 (bias -inf), so no tile needs a bounds mask."""
    cols = start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    col_ok = cols < M
    k = tl.load(k_ptr + cols[:, None] * stride_k + dims[None, :], mask=col_ok[:, None] & (dims < D)[None, :], other=0.0)
    yk = tl.load(yk_ptr + cols, mask=col_ok, other=-2)
    bias_other = tl.load(bias_other_ptr + cols, mask=col_ok, other=-float("inf"))
    bias_same = bias_other
    if CLASS_AVERAGE:
        bias_same = tl.load(bias_same_ptr + cols, mask=col_ok, other=-float("inf"))
    return cols, col_ok, k, yk, bias_other, bias_same


@triton.jit
def _logit_tile(
    a, ya, rows, k, yk, cols, bias_other, bias_same, anchor_offset, scale,
    CLASS_AVERAGE: tl.constexpr, DOT_PRECISION: tl.constexpr, ON_DIAGONAL: tl.constexpr,
):
    """t = log2(w_ij e^{s_ij}) = s_ij log2(e) + bias_j, -inf at the anchor itself, which
    only a tile ON_DIAGONAL holds."""
    t = tl.dot(a, tl.trans(k), input_precision=DOT_PRECISION) * scale
    if CLASS_AVERAGE:
        t += tl.where(ya[:, None] == yk[None, :], bias_same[None, :], bias_other[None, :])
    else:
        t += bias_other[None, :]
    if ON_DIAGONAL:
        t = tl.where(cols[None, :] == rows[:, None] + anchor_offset, -float("inf"), t)
    return t


@triton.jit
def _diagonal_blocks(first, span, offset, limit, BLOCK: tl.constexpr):
    """[lo, hi): the whole blocks of BLOCK, counted from 0 and cut at `limit`, that hold
    positions first + offset .. first + offset + span - 1 (the other side's diagonal).
    The loops over the blocks before lo and from hi skip the self mask."""
    lo = tl.minimum(tl.maximum(first + offset, 0) // BLOCK * BLOCK, limit)
    hi = tl.maximum(lo, tl.minimum(tl.cdiv(tl.maximum(first + offset + span, 0), BLOCK) * BLOCK, limit))
    return lo, hi


@triton.jit
def _fwd_key_blocks(
    lo, hi, run_max, run_sum, acc, a, ya, rows, k_ptr, yk_ptr, bias_other_ptr, bias_same_ptr,
    M, D, anchor_offset, scale, stride_k,
    CLASS_AVERAGE: tl.constexpr, DOT_PRECISION: tl.constexpr, STORE_O: tl.constexpr, ON_DIAGONAL: tl.constexpr,
    FIXED_REF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The log-sum-exp (and O) over the key blocks starting in [lo, hi): against the
    fixed reference run_max with FIXED_REF, else online."""
    for start in range(lo, hi, BLOCK_M):
        cols, col_ok, k, yk, bias_other, bias_same = _load_key_block(
            k_ptr, yk_ptr, bias_other_ptr, bias_same_ptr, start, M, D, stride_k, CLASS_AVERAGE, BLOCK_M, BLOCK_D
        )
        t = _logit_tile(a, ya, rows, k, yk, cols, bias_other, bias_same, anchor_offset, scale,
                        CLASS_AVERAGE, DOT_PRECISION, ON_DIAGONAL)
        if FIXED_REF:
            p = fast_exp2(t - run_max[:, None])
            run_sum += tl.sum(p, 1)
            if STORE_O:
                acc += tl.dot(p.to(k.dtype), k, input_precision=DOT_PRECISION)
        else:  # the reference stays 0 while everything seen is -inf
            new_max = tl.maximum(run_max, tl.max(t, 1))
            ref = tl.where(new_max == -float("inf"), 0.0, new_max)
            alpha = fast_exp2(run_max - ref)
            p = fast_exp2(t - ref[:, None])
            run_sum = run_sum * alpha + tl.sum(p, 1)
            if STORE_O:
                acc = acc * alpha[:, None] + tl.dot(p.to(k.dtype), k, input_precision=DOT_PRECISION)
            run_max = new_max
    return run_max, run_sum, acc


@_autotuned("fwd")
@triton.jit
def _o2a_fwd_kernel(
    a_ptr, ya_ptr, k_ptr, yk_ptr, bias_other_ptr, bias_same_ptr, ref_ptr, log2_den_ptr, o_ptr,
    n, M, D, anchor_offset, scale, stride_a, stride_k, stride_o,
    CLASS_AVERAGE: tl.constexpr, DOT_PRECISION: tl.constexpr, STORE_O: tl.constexpr, FIXED_REF: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_DIAGONAL: tl.constexpr,
):
    """log2 of each anchor's weighted denominator (-inf when it has no other key) and,
    with STORE_O, O_i = sum_j p_ij k_j, the softmax-weighted mean key (FlashAttention's
    output with V = K): the anchors' gradient is then g_i O_i / tau, with no backward
    pass over the tiles. Launched twice: with FIXED_REF for the blocks whose anchors all
    have a fixed reference (`ref_ptr`, fixed_references), without for the others; each
    launch returns at once from the other's blocks. (One launch branching between the two
    would hold both loops' pipeline buffers in shared memory: 118 KB against 67 KB.)"""
    first = tl.program_id(0) * BLOCK_N
    rows, row_ok, a, ya = _load_anchor_block(a_ptr, ya_ptr, first, n, D, stride_a, BLOCK_N, BLOCK_D)
    fixed_ref = tl.load(ref_ptr + rows, mask=row_ok, other=0.0)
    if (tl.max(fixed_ref) < float("inf")) != FIXED_REF:
        return  # the other launch's block
    run_max = fixed_ref if FIXED_REF else tl.full([BLOCK_N], -float("inf"), dtype=tl.float32)
    state = (run_max, tl.zeros([BLOCK_N], dtype=tl.float32), tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32))
    context = (a, ya, rows, k_ptr, yk_ptr, bias_other_ptr, bias_same_ptr, M, D, anchor_offset, scale, stride_k)
    # Split: the anchors' own keys sit in one or two blocks, the only ones that mask.
    if SPLIT_DIAGONAL:
        lo, hi = _diagonal_blocks(first, BLOCK_N, anchor_offset, M, BLOCK_M)
        state = _fwd_key_blocks(0, lo, *state, *context, CLASS_AVERAGE, DOT_PRECISION, STORE_O, False, FIXED_REF,
                                BLOCK_M, BLOCK_D)
        state = _fwd_key_blocks(lo, hi, *state, *context, CLASS_AVERAGE, DOT_PRECISION, STORE_O, True, FIXED_REF,
                                BLOCK_M, BLOCK_D)
        state = _fwd_key_blocks(hi, M, *state, *context, CLASS_AVERAGE, DOT_PRECISION, STORE_O, False, FIXED_REF,
                                BLOCK_M, BLOCK_D)
    else:
        state = _fwd_key_blocks(0, M, *state, *context, CLASS_AVERAGE, DOT_PRECISION, STORE_O, True, FIXED_REF,
                                BLOCK_M, BLOCK_D)
    run_max, run_sum, acc = state
    has_keys = run_sum > 0.0  # false for an anchor with no other key
    log2_den = tl.where(has_keys, run_max + tl.log2(tl.where(has_keys, run_sum, 1.0)), -float("inf"))
    tl.store(log2_den_ptr + rows, log2_den, mask=row_ok)
    if STORE_O:
        dims = tl.arange(0, BLOCK_D)
        o = acc / tl.where(has_keys, run_sum, 1.0)[:, None]
        tl.store(o_ptr + rows[:, None] * stride_o + dims[None, :], o, mask=row_ok[:, None] & (dims < D)[None, :])


@triton.jit
def _grad_tile(t, log2_den, coef):
    """dL/ds_ij = coef_i p_ij, p_ij = w_ij e^{s_ij} / den_i, coef_i = g_i / tau (0 for
    anchors whose log_den is not differentiated; their log2_den is stored finite)."""
    return coef[:, None] * fast_exp2(t - log2_den[:, None])


@triton.jit
def _bwd_anchor_blocks(
    lo, hi, acc, k, yk, cols, bias_other, bias_same, a_ptr, ya_ptr, log2_den_ptr, coef_ptr,
    n, D, anchor_offset, scale, stride_a,
    CLASS_AVERAGE: tl.constexpr, DOT_PRECISION: tl.constexpr, ON_DIAGONAL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """acc += dS^T A over the anchor blocks starting in [lo, hi)."""
    for start in range(lo, hi, BLOCK_N):
        rows, row_ok, a, ya = _load_anchor_block(a_ptr, ya_ptr, start, n, D, stride_a, BLOCK_N, BLOCK_D)
        log2_den = tl.load(log2_den_ptr + rows, mask=row_ok, other=0.0)
        coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
        t = _logit_tile(a, ya, rows, k, yk, cols, bias_other, bias_same, anchor_offset, scale,
                        CLASS_AVERAGE, DOT_PRECISION, ON_DIAGONAL)
        ds = _grad_tile(t, log2_den, coef)
        acc += tl.dot(tl.trans(ds).to(a.dtype), a, input_precision=DOT_PRECISION)
    return acc


@_autotuned("bwd_keys")
@triton.jit
def _o2a_bwd_keys_kernel(
    a_ptr, ya_ptr, k_ptr, yk_ptr, bias_other_ptr, bias_same_ptr, log2_den_ptr, coef_ptr, dk_ptr,
    n, M, D, anchor_offset, scale, stride_a, stride_k, stride_dk,
    CLASS_AVERAGE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_DIAGONAL: tl.constexpr,
):
    """dK_j = sum_i dS_ij a_i, one program per key block streaming the anchors."""
    first = tl.program_id(0) * BLOCK_M
    cols, col_ok, k, yk, bias_other, bias_same = _load_key_block(
        k_ptr, yk_ptr, bias_other_ptr, bias_same_ptr, first, M, D, stride_k, CLASS_AVERAGE, BLOCK_M, BLOCK_D,
    )
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    context = (k, yk, cols, bias_other, bias_same, a_ptr, ya_ptr, log2_den_ptr, coef_ptr, n, D, anchor_offset,
               scale, stride_a)
    # Split: only the anchor blocks that hold these keys (at rows key - anchor_offset) mask.
    if SPLIT_DIAGONAL:
        lo, hi = _diagonal_blocks(first, BLOCK_M, -anchor_offset, n, BLOCK_N)
        acc = _bwd_anchor_blocks(0, lo, acc, *context, CLASS_AVERAGE, DOT_PRECISION, False, BLOCK_N, BLOCK_D)
        acc = _bwd_anchor_blocks(lo, hi, acc, *context, CLASS_AVERAGE, DOT_PRECISION, True, BLOCK_N, BLOCK_D)
        acc = _bwd_anchor_blocks(hi, n, acc, *context, CLASS_AVERAGE, DOT_PRECISION, False, BLOCK_N, BLOCK_D)
    else:
        acc = _bwd_anchor_blocks(0, n, acc, *context, CLASS_AVERAGE, DOT_PRECISION, True, BLOCK_N, BLOCK_D)
    dims = tl.arange(0, BLOCK_D)
    tl.store(
        dk_ptr + cols[:, None] * stride_dk + dims[None, :],
        acc.to(dk_ptr.dtype.element_ty),
        mask=col_ok[:, None] & (dims < D)[None, :],
    )


def key_classes(key_labels: Tensor) -> tuple[Tensor, Tensor]:
    """A class id per key in [0, M), the first position of its label in the sorted
    labels, and the number of keys with each id. Needs no class count: torch.bincount
    would size its output from the largest label, a device-to-host read every forward."""
    slots = torch.searchsorted(torch.sort(key_labels).values, key_labels)
    return slots, torch.zeros_like(slots).index_add_(0, slots, torch.ones_like(slots))


class _LogDenominator(torch.autograd.Function):
    """log_den_i = log sum_{j != i} w_ij exp(a_i . k_j / tau): the kernels' part."""

    @staticmethod
    def forward(
        ctx, anchors: Tensor, keys: Tensor, anchor_slots: Tensor, key_slots: Tensor, bias_other: Tensor,
        bias_same: Tensor, anchor_offset: int, temperature: float, class_average: bool, dot_precision: str,
    ) -> Tensor:
        n, dim = anchors.shape
        m = keys.shape[0]
        log2_den = new_buffer((n,), torch.float32, anchors.device)
        store_o = ctx.needs_input_grad[0]
        # Without an anchor gradient the kernel never touches O; the pointer is a placeholder.
        weighted_keys = new_buffer((n, dim), torch.float32, anchors.device) if store_o else log2_den
        scale = LOG2E.value / temperature
        fixed_refs = fixed_references(anchors, keys, scale)
        # Each launch takes its own blocks (fixed_references' groups).
        for fixed in (True, False) if anchors.dtype in FIXED_REFERENCE_DTYPES else (False,):
            _o2a_fwd_kernel[lambda tile: (triton.cdiv(n, tile["BLOCK_N"]),)](
                a_ptr=anchors, ya_ptr=anchor_slots, k_ptr=keys, yk_ptr=key_slots, bias_other_ptr=bias_other,
                bias_same_ptr=bias_same, ref_ptr=fixed_refs, log2_den_ptr=log2_den, o_ptr=weighted_keys,
                n=n, M=m, D=dim, anchor_offset=anchor_offset, scale=scale, stride_a=anchors.stride(0),
                stride_k=keys.stride(0), stride_o=weighted_keys.stride(0) if store_o else 0,
                CLASS_AVERAGE=class_average, DOT_PRECISION=dot_precision, STORE_O=store_o, FIXED_REF=fixed,
                BLOCK_D=block_d(dim), **launch_tile(dim, anchors.element_size(), "fwd"),
            )
        ctx.save_for_backward(anchors, keys, anchor_slots, key_slots, bias_other, bias_same, log2_den,
                              weighted_keys if store_o else None)
        ctx.params = (anchor_offset, temperature, class_average, dot_precision)
        return log2_den * math.log(2.0)

    @staticmethod
    def backward(ctx, grad_log_den: Tensor):
        anchors, keys, anchor_slots, key_slots, bias_other, bias_same, log2_den, weighted_keys = ctx.saved_tensors
        anchor_offset, temperature, class_average, dot_precision = ctx.params
        n, dim = anchors.shape
        m = keys.shape[0]
        coef = (grad_log_den.float() / temperature).contiguous()
        grad_anchors = grad_keys = None
        if ctx.needs_input_grad[0]:
            grad_anchors = (coef[:, None] * weighted_keys).to(anchors.dtype)
        if ctx.needs_input_grad[1]:
            # An anchor with no other key has log_den = -inf; nothing reaches it (its loss
            # is 0), and a finite stand-in keeps exp2(-inf - log2_den) at 0 rather than NaN.
            log2_den = torch.where(torch.isfinite(log2_den), log2_den, 0.0)
            grad_keys = new_buffer((m, dim), keys.dtype, keys.device)
            _o2a_bwd_keys_kernel[lambda tile: (triton.cdiv(m, tile["BLOCK_M"]),)](
                a_ptr=anchors, ya_ptr=anchor_slots, k_ptr=keys, yk_ptr=key_slots, bias_other_ptr=bias_other,
                bias_same_ptr=bias_same, log2_den_ptr=log2_den, coef_ptr=coef, dk_ptr=grad_keys,
                n=n, M=m, D=dim, anchor_offset=anchor_offset, scale=LOG2E.value / temperature,
                stride_a=anchors.stride(0), stride_k=keys.stride(0), stride_dk=grad_keys.stride(0),
                CLASS_AVERAGE=class_average, DOT_PRECISION=dot_precision, BLOCK_D=block_d(dim),
                **launch_tile(dim, anchors.element_size(), "bwd_keys"),
            )
        return grad_anchors, grad_keys, *([None] * 8)


def fused_o2a_per_anchor(args: O2AArgs, dot_precision: str = "tf32x3") -> tuple[Tensor, Tensor]:
    """Per-anchor O2A loss (n, float32) and number of positives (n, int64), as
    `o2a_per_anchor_reference` on the same `args` (shapes validated by the caller).

    Gradients flow to the anchors and the keys (autograd adds them up when the keys
    were built from the anchors). `dot_precision` applies to float32 inputs: "tf32x3"
    or "ieee" (see DOT_PRECISIONS).
    """
    anchors, keys, anchor_offset, temperature = args.anchors, args.keys, args.anchor_offset, args.temperature
    for name, x in (("anchors", anchors), ("keys", keys)):
        check_kernel_dtype(name, x)
    if keys.dtype != anchors.dtype:
        raise TypeError(f"anchors and keys must share a dtype, got {anchors.dtype} and {keys.dtype}")
    if dot_precision not in DOT_PRECISIONS:
        raise ValueError(f"dot_precision must be one of {', '.join(map(repr, DOT_PRECISIONS))}, got {dot_precision!r}")
    n, m = anchors.shape[0], keys.shape[0]
    if INTERPRETED and anchors.dtype == torch.bfloat16:
        # The interpreter multiplies bfloat16 bit patterns in tl.dot (triton-lang/triton#11584):
        # run it in float32, which holds bfloat16 products exactly; autograd casts the grads back.
        anchors, keys = anchors.float(), keys.float()
    anchors, keys = anchors.contiguous(), keys.contiguous()

    # O(M) per-key quantities: class ids, class sizes and the log2 class weights
    # -log2 |A_c| (anchor of another class) and -log2(|A_c| - 1) (of the key's class).
    key_slots, sizes = key_classes(args.key_labels.contiguous())
    key_sizes = sizes[key_slots].float()
    if args.class_average:
        bias_other = -torch.log2(key_sizes)
        bias_same = -torch.log2((key_sizes - 1).clamp(min=1))
    else:
        bias_other = bias_same = torch.zeros_like(key_sizes)
    key_slots = key_slots.to(torch.int32)
    anchor_slots = key_slots[anchor_offset : anchor_offset + n].contiguous()
    log_den = _LogDenominator.apply(
        anchors, keys, anchor_slots, key_slots, bias_other, bias_same,
        int(anchor_offset), float(temperature), bool(args.class_average), dot_precision,
    )

    # Positives: the keys of the anchor's class but itself, from per-class key sums.
    num_pos = sizes[anchor_slots.long()] - 1
    class_sums = torch.zeros(m, keys.shape[1], device=keys.device).index_add(0, key_slots, keys.float())
    others = class_sums[anchor_slots] - keys[anchor_offset : anchor_offset + n].float()
    pos_mean = (anchors.float() * others).sum(1) / (temperature * num_pos.clamp(min=1))
    loss = torch.where(num_pos > 0, log_den - pos_mean, 0.0)
    return loss, num_pos
