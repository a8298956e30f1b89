"""Fused One-to-All contrastive loss: Triton forward/backward and its autograd Function.

Same contract as `jrcl_fast.losses.reference.o2a_per_anchor_reference`. The n x M
similarity matrix is never stored: the forward streams key blocks through an online
class-weighted log-sum-exp and keeps only per-anchor statistics (log denominator,
number of positives); the backward recomputes each similarity tile, once in a pass
over anchor blocks (gradient of the anchors) and once in a pass over key blocks
(gradient of the keys), so memory stays O((n + M) D).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import check_kernel_dtype, finish_lse, new_buffer, online_lse_rescale

# Whether @triton.jit below builds interpreted functions (decided at import, as here).
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# tf32 would perturb s = a.k / tau by ~1e-3 relative, i.e. ~1e-2 absolute at tau = 0.1,
# which is visible in the loss; "ieee" keeps float32 inputs at float32 precision (at the
# cost of CUDA-core instead of tensor-core FLOPs; half-precision inputs are unaffected).
_DOT_PRECISION: tl.constexpr = tl.constexpr("ieee")


@triton.jit
def _load_anchor_block(a_ptr, ya_ptr, start, n, D, stride_a, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Anchor rows start.. (zero-padded) and their labels (-1 on padding: matches no key)."""
    rows = start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < n
    a = tl.load(a_ptr + rows[:, None] * stride_a + dims[None, :], mask=row_ok[:, None] & (dims < D)[None, :], other=0.0)
    ya = tl.load(ya_ptr + rows, mask=row_ok, other=-1)
    return rows, row_ok, a, ya


@triton.jit
def _load_key_block(
    k_ptr, yk_ptr, count_ptr, start, M, D, stride_k,
    CLASS_AVERAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Key rows start.., their labels (-2 on padding) and the two possible log-weights
    of each key, from the size of its class (count_ptr, one per key): -log|A_c| when the anchor is of another class, -log(|A_c| - 1) when
    it is of the key's class (the anchor itself is then excluded from A_c)."""
    cols = start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    col_ok = cols < M
    k = tl.load(k_ptr + cols[:, None] * stride_k + dims[None, :], mask=col_ok[:, None] & (dims < D)[None, :], other=0.0)
    yk = tl.load(yk_ptr + cols, mask=col_ok, other=-2)
    if CLASS_AVERAGE:
        count = tl.load(count_ptr + cols, mask=col_ok, other=1).to(tl.float32)
        log_w_other = -tl.log(count)
        log_w_same = -tl.log(tl.maximum(count - 1.0, 1.0))
    else:
        log_w_other = tl.zeros([BLOCK_M], dtype=tl.float32)
        log_w_same = log_w_other
    return cols, col_ok, k, yk, log_w_other, log_w_same


@triton.jit
def _similarity_tile(a, ya, rows, k, yk, cols, col_ok, log_w_other, log_w_same, anchor_offset, inv_tau):
    """s = a.k / tau, the weighted logits s + log w with self and padding at -inf,
    and the positive mask (same label, not self)."""
    sim = tl.dot(a, tl.trans(k), input_precision=_DOT_PRECISION) * inv_tau
    same = ya[:, None] == yk[None, :]
    valid = col_ok[None, :] & (cols[None, :] != rows[:, None] + anchor_offset)
    logits = tl.where(valid, sim + tl.where(same, log_w_same[None, :], log_w_other[None, :]), -float("inf"))
    return sim, logits, same & valid


@triton.jit
def _grad_tile(logits, positive, log_den, coef, inv_num_pos):
    """dL/ds = coef_i (w_ij exp(s_ij) / den_i - [j in Pos(i)] / |Pos(i)|), with
    coef_i = g_i / tau (0 for anchors without positives, whose log_den is stored as 0
    to keep the exponent finite); masked entries have logits = -inf and get 0."""
    p = tl.exp(logits - log_den[:, None])
    return coef[:, None] * (p - tl.where(positive, inv_num_pos[:, None], 0.0))


@triton.jit
def _o2a_fwd_kernel(
    a_ptr, ya_ptr, k_ptr, yk_ptr, count_ptr, loss_ptr, num_pos_ptr, log_den_ptr,
    n, M, D, anchor_offset, inv_tau, stride_a, stride_k,
    CLASS_AVERAGE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, row_ok, a, ya = _load_anchor_block(a_ptr, ya_ptr, tl.program_id(0) * BLOCK_N, n, D, stride_a, BLOCK_N, BLOCK_D)
    run_max = tl.full([BLOCK_N], -float("inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    pos_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    num_pos = tl.zeros([BLOCK_N], dtype=tl.int32)
    for start in range(0, M, BLOCK_M):
        cols, col_ok, k, yk, log_w_other, log_w_same = _load_key_block(
            k_ptr, yk_ptr, count_ptr, start, M, D, stride_k, CLASS_AVERAGE, BLOCK_M, BLOCK_D
        )
        sim, logits, positive = _similarity_tile(
            a, ya, rows, k, yk, cols, col_ok, log_w_other, log_w_same, anchor_offset, inv_tau
        )
        run_max, m_ref, run_sum = online_lse_rescale(run_max, run_sum, tl.max(logits, 1))
        run_sum += tl.sum(tl.exp(logits - m_ref[:, None]), 1)
        pos_sum += tl.sum(tl.where(positive, sim, 0.0), 1)
        num_pos += tl.sum(positive.to(tl.int32), 1)
    log_den = finish_lse(run_max, run_sum)
    has_pos = num_pos > 0
    loss = tl.where(has_pos, log_den - pos_sum / tl.maximum(num_pos, 1).to(tl.float32), 0.0)
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    tl.store(num_pos_ptr + rows, num_pos, mask=row_ok)
    tl.store(log_den_ptr + rows, tl.where(has_pos, log_den, 0.0), mask=row_ok)


@triton.jit
def _o2a_bwd_anchors_kernel(
    a_ptr, ya_ptr, k_ptr, yk_ptr, count_ptr, log_den_ptr, coef_ptr, inv_num_pos_ptr, da_ptr,
    n, M, D, anchor_offset, inv_tau, stride_a, stride_k, stride_da,
    CLASS_AVERAGE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dA_i = sum_j dS_ij k_j, one program per anchor block streaming the keys."""
    rows, row_ok, a, ya = _load_anchor_block(a_ptr, ya_ptr, tl.program_id(0) * BLOCK_N, n, D, stride_a, BLOCK_N, BLOCK_D)
    log_den = tl.load(log_den_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    inv_num_pos = tl.load(inv_num_pos_ptr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start in range(0, M, BLOCK_M):
        cols, col_ok, k, yk, log_w_other, log_w_same = _load_key_block(
            k_ptr, yk_ptr, count_ptr, start, M, D, stride_k, CLASS_AVERAGE, BLOCK_M, BLOCK_D
        )
        _, logits, positive = _similarity_tile(
            a, ya, rows, k, yk, cols, col_ok, log_w_other, log_w_same, anchor_offset, inv_tau
        )
        ds = _grad_tile(logits, positive, log_den, coef, inv_num_pos)
        acc += tl.dot(ds.to(k.dtype), k, input_precision=_DOT_PRECISION)
    dims = tl.arange(0, BLOCK_D)
    tl.store(
        da_ptr + rows[:, None] * stride_da + dims[None, :],
        acc.to(da_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (dims < D)[None, :],
    )


@triton.jit
def _o2a_bwd_keys_kernel(
    a_ptr, ya_ptr, k_ptr, yk_ptr, count_ptr, log_den_ptr, coef_ptr, inv_num_pos_ptr, dk_ptr,
    n, M, D, anchor_offset, inv_tau, stride_a, stride_k, stride_dk,
    CLASS_AVERAGE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK_j = sum_i dS_ij a_i, one program per key block streaming the anchors."""
    cols, col_ok, k, yk, log_w_other, log_w_same = _load_key_block(
        k_ptr, yk_ptr, count_ptr, tl.program_id(0) * BLOCK_M, M, D, stride_k, CLASS_AVERAGE, BLOCK_M, BLOCK_D
    )
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        rows, row_ok, a, ya = _load_anchor_block(a_ptr, ya_ptr, start, n, D, stride_a, BLOCK_N, BLOCK_D)
        log_den = tl.load(log_den_ptr + rows, mask=row_ok, other=0.0)
        coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
        inv_num_pos = tl.load(inv_num_pos_ptr + rows, mask=row_ok, other=0.0)
        _, logits, positive = _similarity_tile(
            a, ya, rows, k, yk, cols, col_ok, log_w_other, log_w_same, anchor_offset, inv_tau
        )
        ds = _grad_tile(logits, positive, log_den, coef, inv_num_pos)
        acc += tl.dot(tl.trans(ds).to(a.dtype), a, input_precision=_DOT_PRECISION)
    dims = tl.arange(0, BLOCK_D)
    tl.store(
        dk_ptr + cols[:, None] * stride_dk + dims[None, :],
        acc.to(dk_ptr.dtype.element_ty),
        mask=col_ok[:, None] & (dims < D)[None, :],
    )


def _launch_config(dim: int, elem_size: int) -> dict[str, int]:
    """64 x 64 similarity tiles while a D-wide row is at most 256 bytes, else 32 x 32;
    8 warps except for narrow half-precision rows. Checked with ptxas for sm_90
    (D = 32..256, fp32/bf16/fp16): no register spills, except 16 bytes in the bf16/fp16
    D = 128 anchor-gradient kernel, where 64 x 64 float32 tiles spilled kilobytes."""
    block_d = max(16, triton.next_power_of_2(dim))
    row_bytes = block_d * elem_size
    return {
        "BLOCK_N": 64 if row_bytes <= 256 else 32,
        "BLOCK_M": 64 if row_bytes <= 256 else 32,
        "BLOCK_D": block_d,
        "num_warps": 4 if elem_size == 2 and block_d <= 64 else 8,
    }


def key_class_sizes(key_labels: Tensor) -> Tensor:
    """Number of keys of each key's class (M, int32), in O(M log M) without knowing
    the class count: torch.bincount would size its output from the largest label,
    which makes the host wait for the device in every forward."""
    sorted_labels = torch.sort(key_labels).values
    first = torch.searchsorted(sorted_labels, key_labels)
    return (torch.searchsorted(sorted_labels, key_labels, right=True) - first).to(torch.int32)


class _O2AFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        anchors: Tensor,
        keys: Tensor,
        anchor_labels: Tensor,
        key_labels: Tensor,
        anchor_offset: int,
        temperature: float,
        class_average: bool,
    ) -> tuple[Tensor, Tensor]:
        n, dim = anchors.shape
        m = keys.shape[0]
        counts = key_class_sizes(key_labels)
        loss = new_buffer((n,), torch.float32, anchors.device)
        num_pos = new_buffer((n,), torch.int32, anchors.device)
        log_den = new_buffer((n,), torch.float32, anchors.device)
        cfg = _launch_config(dim, anchors.element_size())
        _o2a_fwd_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
            anchors, anchor_labels, keys, key_labels, counts, loss, num_pos, log_den,
            n, m, dim, anchor_offset, 1.0 / temperature, anchors.stride(0), keys.stride(0),
            CLASS_AVERAGE=class_average, **cfg,
        )
        ctx.save_for_backward(anchors, keys, anchor_labels, key_labels, counts, log_den, num_pos)
        ctx.params = (anchor_offset, temperature, class_average)
        num_pos = num_pos.long()
        ctx.mark_non_differentiable(num_pos)
        return loss, num_pos

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_num_pos: Tensor | None):
        anchors, keys, anchor_labels, key_labels, counts, log_den, num_pos = ctx.saved_tensors
        anchor_offset, temperature, class_average = ctx.params
        n, dim = anchors.shape
        m = keys.shape[0]
        # O(n) per-anchor factors of dS; anchors without positives get coef 0.
        coef = torch.where(num_pos > 0, grad_loss.float() / temperature, 0.0).contiguous()
        inv_num_pos = 1.0 / num_pos.clamp(min=1).float()
        cfg = _launch_config(dim, anchors.element_size())
        common = (anchors, anchor_labels, keys, key_labels, counts, log_den, coef, inv_num_pos)
        sizes = (n, m, dim, anchor_offset, 1.0 / temperature, anchors.stride(0), keys.stride(0))
        grad_anchors = grad_keys = None
        if ctx.needs_input_grad[0]:
            grad_anchors = new_buffer((n, dim), anchors.dtype, anchors.device)
            _o2a_bwd_anchors_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
                *common, grad_anchors, *sizes, grad_anchors.stride(0), CLASS_AVERAGE=class_average, **cfg
            )
        if ctx.needs_input_grad[1]:
            grad_keys = new_buffer((m, dim), keys.dtype, keys.device)
            _o2a_bwd_keys_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
                *common, grad_keys, *sizes, grad_keys.stride(0), CLASS_AVERAGE=class_average, **cfg
            )
        return grad_anchors, grad_keys, None, None, None, None, None


def fused_o2a_per_anchor(
    anchors: Tensor,
    anchor_labels: Tensor,
    keys: Tensor,
    key_labels: Tensor,
    anchor_offset: int,
    temperature: float,
    class_average: bool = True,
) -> tuple[Tensor, Tensor]:
    """Per-anchor O2A loss (n, float32) and number of positives (n, int64).

    anchors (n x D) are rows `anchor_offset ..` of keys (M x D); gradients flow to
    both (autograd adds them up when keys was built from the anchors).
    """
    for name, x in (("anchors", anchors), ("keys", keys)):
        check_kernel_dtype(name, x)
    n, m = anchors.shape[0], keys.shape[0]
    if keys.dtype != anchors.dtype:
        raise TypeError(f"anchors and keys must share a dtype, got {anchors.dtype} and {keys.dtype}")
    if keys.shape[1] != anchors.shape[1]:
        raise ValueError(f"anchors and keys must have the same width, got {anchors.shape[1]} and {keys.shape[1]}")
    if not 0 <= anchor_offset <= m - n:
        raise ValueError(f"anchors must be rows {anchor_offset}..{anchor_offset + n - 1} of {m} keys")
    if _INTERPRETED and anchors.dtype == torch.bfloat16:
        # The interpreter multiplies bfloat16 bit patterns in tl.dot (triton-lang/triton#11584):
        # run it in float32, which holds bfloat16 products exactly; autograd casts the grads back.
        anchors, keys = anchors.float(), keys.float()
    return _O2AFunction.apply(
        anchors.contiguous(),
        keys.contiguous(),
        anchor_labels.contiguous(),
        key_labels.contiguous(),
        int(anchor_offset),
        float(temperature),
        bool(class_average),
    )
