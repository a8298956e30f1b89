"""Fused CE + binary CE + BDC classifier loss: Triton kernel and its autograd Function.

Same contract as `jrcl_fast.losses.reference.ce_bdc_reference`. One program per row
reads the logits once to get every log-sum-exp the loss needs (adjusted logits,
normal group, abnormal group; the plain softmax normaliser is their log-add-exp)
and, when a gradient is wanted, a second time to write d total / d logits, as
Liger-Kernel's cross-entropy does: the gradient is produced in the forward and
only scaled by the incoming gradient in the backward.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import check_kernel_dtype, finish_lse, new_buffer, online_lse_rescale

_LOG2: tl.constexpr = tl.constexpr(math.log(2.0))


@triton.jit
def _softplus(x):
    """log(1 + e^x) without overflow."""
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _logaddexp(x, y):
    """log(e^x + e^y)."""
    return x + _softplus(y - x)


@triton.jit
def _divergence_term(log_p, log_q, SYM_KL: tl.constexpr):
    """One component k of the divergence and its derivatives w.r.t. log pi_k and
    log q_k. For JS the terms through the mixture m cancel, leaving
    d/dlog pi_k = pi_k (log pi_k - log m_k) / 2, and likewise for q."""
    p = tl.exp(log_p)
    q = tl.exp(log_q)
    if SYM_KL:
        diff = log_p - log_q
        d_log_p = p * diff + (p - q)
        d_log_q = -q * diff - (p - q)
        value = (p - q) * diff
    else:
        log_m = _logaddexp(log_p, log_q) - _LOG2
        d_log_p = 0.5 * p * (log_p - log_m)
        d_log_q = 0.5 * q * (log_q - log_m)
        value = d_log_p + d_log_q
    return value, d_log_p, d_log_q


@triton.jit
def _load_block(z_row, normal_ptr, adj_ptr, cols, C, HAS_ADJ: tl.constexpr):
    """Raw logits (float32, -inf on padding), normal-group flags and adjusted logits."""
    ok = cols < C
    z = tl.load(z_row + cols, mask=ok, other=-float("inf")).to(tl.float32)
    normal = tl.load(normal_ptr + cols, mask=ok, other=0) != 0
    z_adj = z
    if HAS_ADJ:
        z_adj = z + tl.load(adj_ptr + cols, mask=ok, other=0.0)
    return ok, z, normal, z_adj


@triton.jit
def _ce_bdc_kernel(
    z_ptr, b_ptr, y_ptr, normal_ptr, adj_ptr,
    ce_ptr, bce_ptr, bdc_ptr, dz_ptr, db_ptr,
    C, stride_z, stride_b, stride_dz, stride_db, lambda_bin, lambda_bdc, inv_batch,
    HAS_ADJ: tl.constexpr, SYM_KL: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z

    # Pass 1: streaming log-sum-exps over the normal group, the abnormal group and
    # (with a logit adjustment) the adjusted logits. Separate group sums keep
    # log p_normal and log p_abnormal finite when either mass underflows.
    neg_inf = tl.full([], -float("inf"), tl.float32)
    zero = tl.zeros([], tl.float32)
    max_n, sum_n, max_a, sum_a, max_adj, sum_adj = neg_inf, zero, neg_inf, zero, neg_inf, zero
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        ok, z, normal, z_adj = _load_block(z_row, normal_ptr, adj_ptr, cols, C, HAS_ADJ)
        z_n = tl.where(normal, z, -float("inf"))
        z_a = tl.where(normal, -float("inf"), z)
        max_n, ref_n, sum_n = online_lse_rescale(max_n, sum_n, tl.max(z_n, 0))
        sum_n += tl.sum(tl.exp(z_n - ref_n), 0)
        max_a, ref_a, sum_a = online_lse_rescale(max_a, sum_a, tl.max(z_a, 0))
        sum_a += tl.sum(tl.exp(z_a - ref_a), 0)
        if HAS_ADJ:
            max_adj, ref_adj, sum_adj = online_lse_rescale(max_adj, sum_adj, tl.max(z_adj, 0))
            sum_adj += tl.sum(tl.exp(z_adj - ref_adj), 0)
    # log pi_group = lse_group - lse, written so that no two logit-sized numbers are
    # subtracted after rounding: the group maxima differ by an exact-ish logit
    # difference and the sums are O(C). Keeps log pi accurate to its own magnitude
    # (near 0 for the dominant group) when the logits are in the hundreds.
    top = tl.maximum(max_n, max_a)
    log_total = tl.log(sum_n * tl.exp(max_n - top) + sum_a * tl.exp(max_a - top))
    log_pi_n = (max_n - top) + tl.log(sum_n) - log_total
    log_pi_a = (max_a - top) + tl.log(sum_a) - log_total
    lse = top + log_total
    lse_adj = lse
    if HAS_ADJ:
        lse_adj = finish_lse(max_adj, sum_adj)

    label = tl.load(y_ptr + row)
    z_label = tl.load(z_row + label).to(tl.float32)
    if HAS_ADJ:
        z_label += tl.load(adj_ptr + label)
    ce = lse_adj - z_label

    # Binary head: column 0 is normal; the target is 1 when the label is abnormal.
    # log q from the logit difference alone, for the same reason as log pi.
    b0 = tl.load(b_ptr + row * stride_b).to(tl.float32)
    b1 = tl.load(b_ptr + row * stride_b + 1).to(tl.float32)
    log_q0 = -_softplus(b1 - b0)
    log_q1 = -_softplus(b0 - b1)
    abnormal = tl.load(normal_ptr + label) == 0
    bce = -tl.where(abnormal, log_q1, log_q0)

    div_n, g_pi_n, g_q0 = _divergence_term(log_pi_n, log_q0, SYM_KL)
    div_a, g_pi_a, g_q1 = _divergence_term(log_pi_a, log_q1, SYM_KL)
    tl.store(ce_ptr + row, ce)
    tl.store(bce_ptr + row, bce)
    tl.store(bdc_ptr + row, div_n + div_a)

    if COMPUTE_GRAD:
        # d/db_0 (d/db_1 is its negative): binary CE gives q_0 - [target = 0]; BDC, through
        # log q_k = b_k - logsumexp(b), gives g_q0 - (g_q0 + g_q1) q_0. Both are written
        # with q_1 = 1 - q_0 substituted, so nothing cancels when the head saturates.
        q0 = tl.exp(log_q0)
        q1 = tl.exp(log_q1)
        db0 = lambda_bin * tl.where(abnormal, q0, -q1) + lambda_bdc * (g_q0 * q1 - g_q1 * q0)
        db_row = db_ptr + row * stride_db
        tl.store(db_row, (inv_batch * db0).to(db_ptr.dtype.element_ty))
        tl.store(db_row + 1, (-inv_batch * db0).to(db_ptr.dtype.element_ty))

        # Pass 2, d/dz_c: CE gives softmax(z + adj)_c - [c = y]. Through log pi_group =
        # lse_group - lse, BDC gives g_group softmax_group(z)_c - (g_n + g_a) p_c; with
        # p_c = pi_group softmax_group(z)_c this is +-h softmax_group(z)_c, where
        # h = g_n pi_a - g_a pi_n is formed once per row instead of cancelling per class
        # (g reaches |log pi - log q| ~ 100 when the heads saturate).
        h = g_pi_n * tl.exp(log_pi_a) - g_pi_a * tl.exp(log_pi_n)
        dz_row = dz_ptr + row * stride_dz
        for start in range(0, C, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            ok, z, normal, z_adj = _load_block(z_row, normal_ptr, adj_ptr, cols, C, HAS_ADJ)
            d_ce = tl.exp(z_adj - lse_adj) - tl.where(cols == label, 1.0, 0.0)
            # Each class against its own group's max: exp(z - max) <= 1, never overflows.
            group_max = tl.where(normal, max_n, max_a)
            group_sum = tl.where(normal, sum_n, sum_a)
            d_bdc = tl.where(normal, h, -h) * tl.exp(z - group_max) / group_sum
            dz = inv_batch * (d_ce + lambda_bdc * d_bdc)
            tl.store(dz_row + cols, dz.to(dz_ptr.dtype.element_ty), mask=ok)


def _block_c(num_classes: int) -> tuple[int, int]:
    """Whole rows up to 2048 classes in one block (one read per pass); wider rows loop."""
    block = min(triton.next_power_of_2(num_classes), 2048)
    return block, 4 if block <= 512 else 8


class _CEBDCFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits: Tensor,
        binary_logits: Tensor,
        labels: Tensor,
        normal_mask: Tensor,
        logit_adjustment: Tensor | None,
        lambda_bin: float,
        lambda_bdc: float,
        sym_kl: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        batch, num_classes = logits.shape
        device = logits.device
        compute_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        per_row = [new_buffer((batch,), torch.float32, device) for _ in range(3)]
        # Without a gradient the kernel never touches these; the pointers are placeholders.
        grad_logits = new_buffer(logits.shape, logits.dtype, device) if compute_grad else logits
        grad_binary = new_buffer(binary_logits.shape, binary_logits.dtype, device) if compute_grad else binary_logits
        has_adj = logit_adjustment is not None
        adjustment = logit_adjustment.float().contiguous() if has_adj else logits
        block, num_warps = _block_c(num_classes)
        _ce_bdc_kernel[(batch,)](
            logits, binary_logits, labels, normal_mask.to(torch.int8), adjustment,
            *per_row, grad_logits, grad_binary,
            num_classes, logits.stride(0), binary_logits.stride(0), grad_logits.stride(0), grad_binary.stride(0),
            float(lambda_bin), float(lambda_bdc), 1.0 / max(batch, 1),
            HAS_ADJ=has_adj, SYM_KL=sym_kl, COMPUTE_GRAD=compute_grad,
            BLOCK_C=block, num_warps=num_warps,
        )
        # B = 0 launches no program (the 1 above only avoids dividing by 0) and these
        # means over no rows are NaN, as the reference's are.
        ce, binary_ce, bdc = (x.mean() for x in per_row)
        total = ce + lambda_bin * binary_ce + lambda_bdc * bdc
        if compute_grad:
            ctx.save_for_backward(grad_logits, grad_binary)
        ctx.mark_non_differentiable(ce, binary_ce, bdc)
        return total, ce, binary_ce, bdc

    @staticmethod
    def backward(ctx, grad_total: Tensor, *_grad_terms: Tensor | None):
        grad_logits, grad_binary = ctx.saved_tensors
        # Out of place: the saved gradient must survive a second backward (retain_graph).
        return (
            grad_logits * grad_total.to(grad_logits.dtype) if ctx.needs_input_grad[0] else None,
            grad_binary * grad_total.to(grad_binary.dtype) if ctx.needs_input_grad[1] else None,
            None, None, None, None, None, None,
        )


def fused_ce_bdc(
    logits: Tensor,
    binary_logits: Tensor,
    labels: Tensor,
    normal_mask: Tensor,
    logit_adjustment: Tensor | None = None,
    lambda_bin: float = 1.0,
    lambda_bdc: float = 1.0,
    sym_kl: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Batch means (total, ce, binary_ce, bdc), float32; only `total` has gradients
    (to logits and binary_logits; the logit adjustment is treated as a constant).
    The divergence is Jensen-Shannon, or symmetric KL with `sym_kl`; the divergence
    names users write are validated in jrcl_fast.losses, which this leaf never imports."""
    check_kernel_dtype("logits", logits)
    check_kernel_dtype("binary_logits", binary_logits)
    return _CEBDCFunction.apply(
        logits.contiguous(),
        binary_logits.contiguous(),
        labels.contiguous(),
        normal_mask,
        logit_adjustment,
        lambda_bin,
        lambda_bdc,
        bool(sym_kl),
    )
