"""Fused CE + binary CE + BDC classifier loss: Triton kernel and its autograd Function.

Same contract and arguments (`specs.CEBDCArgs`) as
`jrcl_fast.losses.reference.ce_bdc_reference`. One program per few
rows reads the logits once to get every log-sum-exp the loss needs (adjusted logits,
normal group, abnormal group; the plain softmax normaliser is their log-add-exp)
and, when a gradient is wanted, a second time to write d total / d logits, as
Liger-Kernel's cross-entropy does: the gradient is produced in the forward and
only scaled, in place, by the incoming gradient in the backward. Full blocks of
classes load without masks (vectorised when the row stride is a multiple of 16
elements); only the tail block is masked.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import LOG2E, check_kernel_dtype, fast_exp2, finish_lse, new_buffer
from .specs import CEBDCArgs

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
def _load_block(z_ptr, offs, normal_ptr, adj_ptr, cols, C, HAS_ADJ: tl.constexpr, MASKED: tl.constexpr):
    """A rows x classes block: raw logits (float32), the classes' normal flags and the
    adjusted logits. Only the tail block (MASKED) checks cols < C, padding with -inf
    logits: the full blocks load without masks, in 16-byte vectors when the row
    stride allows."""
    if MASKED:
        ok = cols < C
        z = tl.load(z_ptr + offs, mask=ok[None, :], other=-float("inf")).to(tl.float32)
        normal = tl.load(normal_ptr + cols, mask=ok, other=0) != 0
    else:
        z = tl.load(z_ptr + offs).to(tl.float32)
        normal = tl.load(normal_ptr + cols) != 0
    z_adj = z
    if HAS_ADJ:
        if MASKED:
            z_adj = z + tl.load(adj_ptr + cols, mask=cols < C, other=0.0)[None, :]
        else:
            z_adj = z + tl.load(adj_ptr + cols)[None, :]
    return z, normal[None, :], z_adj


@triton.jit
def _lse_step(m, s, x, MASKED: tl.constexpr):
    """One logit x into a running (max m, sum s relative to m) kept per position in the
    block: one exp, exp(-|x - m|), serves both cases (x the new max or not), and no
    value crosses threads until the loop is over."""
    if MASKED:  # padding (-inf) against a slot that has seen nothing yet (-inf): t = 0, not NaN
        m_ref = tl.where(x == -float("inf"), 0.0, m)
    else:
        m_ref = m
    t = fast_exp2(-tl.abs(x - m_ref) * LOG2E)
    new_max = x > m
    return tl.where(new_max, x, m), tl.where(new_max, s * t + 1.0, s + t)


@triton.jit
def _stats_block(
    z_ptr, offs, normal_ptr, adj_ptr, cols, C, max_n, sum_n, max_a, sum_a, max_adj, sum_adj,
    HAS_ADJ: tl.constexpr, MASKED: tl.constexpr,
):
    """Pass 1 on one block: running log-sum-exps of the normal group, the abnormal
    group (each logit into its own group's) and the adjusted logits."""
    z, normal, z_adj = _load_block(z_ptr, offs, normal_ptr, adj_ptr, cols, C, HAS_ADJ, MASKED)
    m, s = _lse_step(tl.where(normal, max_n, max_a), tl.where(normal, sum_n, sum_a), z, MASKED)
    max_n, sum_n = tl.where(normal, m, max_n), tl.where(normal, s, sum_n)
    max_a, sum_a = tl.where(normal, max_a, m), tl.where(normal, sum_a, s)
    if HAS_ADJ:
        max_adj, sum_adj = _lse_step(max_adj, sum_adj, z_adj, MASKED)
    return max_n, sum_n, max_a, sum_a, max_adj, sum_adj


@triton.jit
def _merge_lse(m, s):
    """Per-row (max, sum relative to it) from the per-position running statistics."""
    top = tl.max(m, 1)
    ref = tl.where(top == -float("inf"), 0.0, top)
    return top, tl.sum(s * fast_exp2((m - ref[:, None]) * LOG2E), 1)


@triton.jit
def _grad_block(
    z_ptr, dz_ptr, offs, dz_offs, row_ok, normal_ptr, adj_ptr, cols, C, lse_n, lse_a, coef_n, coef_a, lse_adj,
    HAS_ADJ: tl.constexpr, MASKED: tl.constexpr,
):
    """Pass 2 on one block: d total / d z_c without the -1 of the label (written after
    the loop). e = softmax_group(z)_c = exp(z_c - lse_group) and the per-row group
    coefficients (see the kernel) make it one exp per logit, two with an adjustment."""
    z, normal, z_adj = _load_block(z_ptr, offs, normal_ptr, adj_ptr, cols, C, HAS_ADJ, MASKED)
    e = fast_exp2(z * LOG2E - tl.where(normal, (lse_n * LOG2E)[:, None], (lse_a * LOG2E)[:, None]))
    dz = e * tl.where(normal, coef_n[:, None], coef_a[:, None])
    if HAS_ADJ:
        dz += fast_exp2(z_adj * LOG2E - (lse_adj * LOG2E)[:, None])
    mask = row_ok[:, None]
    if MASKED:
        mask = mask & (cols < C)[None, :]
    tl.store(dz_ptr + dz_offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ce_bdc_kernel(
    z_ptr, b_ptr, y_ptr, normal_ptr, adj_ptr,
    ce_ptr, bce_ptr, bdc_ptr, dz_ptr, db_ptr,
    B, C, stride_z, stride_b, stride_dz, stride_db, lambda_bin, lambda_bdc_z, lambda_bdc_b, inv_batch,
    HAS_ADJ: tl.constexpr, SYM_KL: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # lambda_bdc_z and lambda_bdc_b are BDC's weight in the gradient of the logits and of
    # the binary head: lambda_bdc, or 0 where BDC's gradient to that head is stopped.
    # ROWS rows per program share the loads of the per-class flags and adjustment.
    # Rows past the batch read the last row again (no masks on the loads) and store nothing.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    rows = tl.minimum(rows, B - 1).to(tl.int64)
    z_rows = rows[:, None] * stride_z
    full = C - C % BLOCK_C  # classes covered by unmasked blocks

    # Pass 1. Separate group sums keep log p_normal and log p_abnormal finite when either
    # mass underflows against the other.
    neg_inf = tl.full([ROWS, BLOCK_C], -float("inf"), tl.float32)
    zero = tl.zeros([ROWS, BLOCK_C], tl.float32)
    max_n, sum_n, max_a, sum_a, max_adj, sum_adj = neg_inf, zero, neg_inf, zero, neg_inf, zero
    for start in range(0, full, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        max_n, sum_n, max_a, sum_a, max_adj, sum_adj = _stats_block(
            z_ptr, z_rows + cols[None, :], normal_ptr, adj_ptr, cols, C,
            max_n, sum_n, max_a, sum_a, max_adj, sum_adj, HAS_ADJ, False,
        )
    if full < C:
        cols = full + tl.arange(0, BLOCK_C)
        max_n, sum_n, max_a, sum_a, max_adj, sum_adj = _stats_block(
            z_ptr, z_rows + cols[None, :], normal_ptr, adj_ptr, cols, C,
            max_n, sum_n, max_a, sum_a, max_adj, sum_adj, HAS_ADJ, True,
        )
    max_n, sum_n = _merge_lse(max_n, sum_n)
    max_a, sum_a = _merge_lse(max_a, sum_a)
    max_adj, sum_adj = _merge_lse(max_adj, sum_adj)
    # log pi_group = lse_group - lse, written so that no two logit-sized numbers are
    # subtracted after rounding: the group maxima differ by an exact-ish logit
    # difference and the sums are O(C). Keeps log pi accurate to its own magnitude
    # (near 0 for the dominant group) when the logits are in the hundreds. Each group
    # has a class, so its max is finite and its sum at least 1.
    top = tl.maximum(max_n, max_a)
    log_total = tl.log(sum_n * tl.exp(max_n - top) + sum_a * tl.exp(max_a - top))
    log_pi_n = (max_n - top) + tl.log(sum_n) - log_total
    log_pi_a = (max_a - top) + tl.log(sum_a) - log_total
    lse = top + log_total
    lse_adj = lse
    if HAS_ADJ:
        lse_adj = finish_lse(max_adj, sum_adj)

    # A label outside [0, C) makes its row's CE NaN (the value checks that would name it
    # read device memory, so they are off on the GPU): the trainer stops on the NaN loss.
    label = tl.load(y_ptr + rows)
    label_ok = (label >= 0) & (label < C)
    label = tl.where(label_ok, label, 0)
    z_label = tl.load(z_ptr + rows * stride_z + label).to(tl.float32)
    adj_label = 0.0
    if HAS_ADJ:
        adj_label = tl.load(adj_ptr + label)
    ce = tl.where(label_ok, lse_adj - (z_label + adj_label), float("nan"))

    # Binary head: column 0 is normal; the target is 1 when the label is abnormal.
    # log q from the logit difference alone, for the same reason as log pi.
    b0 = tl.load(b_ptr + rows * stride_b).to(tl.float32)
    b1 = tl.load(b_ptr + rows * stride_b + 1).to(tl.float32)
    log_q0 = -_softplus(b1 - b0)
    log_q1 = -_softplus(b0 - b1)
    abnormal = tl.load(normal_ptr + label) == 0
    bce = -tl.where(abnormal, log_q1, log_q0)

    div_n, g_pi_n, g_q0 = _divergence_term(log_pi_n, log_q0, SYM_KL)
    div_a, g_pi_a, g_q1 = _divergence_term(log_pi_a, log_q1, SYM_KL)
    tl.store(ce_ptr + rows, ce, mask=row_ok)
    tl.store(bce_ptr + rows, bce, mask=row_ok)
    tl.store(bdc_ptr + rows, div_n + div_a, mask=row_ok)

    if COMPUTE_GRAD:
        # d/db_0 (d/db_1 is its negative): binary CE gives q_0 - [target = 0]; BDC, through
        # log q_k = b_k - logsumexp(b), gives g_q0 - (g_q0 + g_q1) q_0. Both are written
        # with q_1 = 1 - q_0 substituted, so nothing cancels when the head saturates.
        q0 = tl.exp(log_q0)
        q1 = tl.exp(log_q1)
        db0 = lambda_bin * tl.where(abnormal, q0, -q1) + lambda_bdc_b * (g_q0 * q1 - g_q1 * q0)
        db_rows = db_ptr + rows * stride_db
        tl.store(db_rows, (inv_batch * db0).to(db_ptr.dtype.element_ty), mask=row_ok)
        tl.store(db_rows + 1, (-inv_batch * db0).to(db_ptr.dtype.element_ty), mask=row_ok)

        # Pass 2, d/dz_c. Through log pi_group = lse_group - lse, BDC gives
        # g_group softmax_group(z)_c - (g_n + g_a) p_c; with p_c = pi_group softmax_group(z)_c
        # this is +-h softmax_group(z)_c, where h = g_n pi_a - g_a pi_n is formed once per
        # row instead of cancelling per class (g reaches |log pi - log q| ~ 100 when the
        # heads saturate). CE gives softmax(z + adj)_c - [c = y]; without an adjustment
        # its softmax is pi_group softmax_group(z)_c, so both terms share one exp.
        pi_n = tl.exp(log_pi_n)
        pi_a = tl.exp(log_pi_a)
        h = lambda_bdc_z * (g_pi_n * pi_a - g_pi_a * pi_n)
        coef_n, coef_a = h, -h
        if not HAS_ADJ:
            coef_n += pi_n
            coef_a += pi_a
        lse_n = max_n + tl.log(sum_n)
        lse_a = max_a + tl.log(sum_a)
        coef_n *= inv_batch
        coef_a *= inv_batch
        lse_adj_scaled = lse_adj - tl.log(inv_batch)  # exp(z_adj - this) = inv_batch * softmax
        dz_rows = rows[:, None] * stride_dz
        for start in range(0, full, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            _grad_block(z_ptr, dz_ptr, z_rows + cols[None, :], dz_rows + cols[None, :], row_ok, normal_ptr, adj_ptr,
                        cols, C, lse_n, lse_a, coef_n, coef_a, lse_adj_scaled, HAS_ADJ, False)
        if full < C:
            cols = full + tl.arange(0, BLOCK_C)
            _grad_block(z_ptr, dz_ptr, z_rows + cols[None, :], dz_rows + cols[None, :], row_ok, normal_ptr, adj_ptr,
                        cols, C, lse_n, lse_a, coef_n, coef_a, lse_adj_scaled, HAS_ADJ, True)
        # The label's -1, over what pass 2 wrote there (other threads of this program
        # may have written it: the barrier orders the two stores).
        tl.debug_barrier()
        label_normal = abnormal == 0
        e_label = tl.exp(z_label - tl.where(label_normal, lse_n, lse_a))
        dz_label = e_label * tl.where(label_normal, coef_n, coef_a) - inv_batch
        if HAS_ADJ:
            dz_label += tl.exp(z_label + adj_label - lse_adj_scaled)
        tl.store(dz_ptr + rows * stride_dz + label, dz_label.to(dz_ptr.dtype.element_ty), mask=row_ok & label_ok)


def _launch_config(num_classes: int) -> dict[str, int]:
    """Blocks of up to 2048 classes (whole rows below that) and as many rows as make
    about 2048 logits per program, so short rows still fill one. Pass 1 keeps six
    running statistics per logit of the block in registers: at 8 logits per thread
    (one 16-byte bf16 vector) that is ~93 registers for C = 8,142 (kernel_sass.py),
    two programs per SM."""
    block = min(triton.next_power_of_2(max(num_classes, 1)), 2048)
    rows = max(1, min(16, 2048 // block))
    return {"BLOCK_C": block, "ROWS": rows, "num_warps": 4 if block * rows <= 1024 else 8}


class _CEBDCFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits: Tensor,
        binary_logits: Tensor,
        args: CEBDCArgs,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`logits` and `binary_logits` are args' own, laid out for the kernel: passed
        apart so that autograd sees them as the inputs."""
        labels, normal_mask, logit_adjustment = args.labels, args.normal_mask, args.logit_adjustment
        lambda_bin, lambda_bdc = float(args.lambda_bin), float(args.lambda_bdc)
        batch, num_classes = logits.shape
        device = logits.device
        compute_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        per_row = [new_buffer((batch,), torch.float32, device) for _ in range(3)]
        # Without a gradient the kernel never touches these; the pointers are placeholders.
        # The logits' gradient takes their row stride (a classifier padded to a multiple
        # of 16 classes hands over an aligned view), so both are read and written in vectors.
        grad_logits = logits
        if compute_grad:
            # (At least C: an expanded batch of one row has row stride 0.)
            row_stride = max(logits.stride(0), num_classes)
            grad_logits = new_buffer((batch, row_stride), logits.dtype, device)[:, :num_classes]
        grad_binary = new_buffer(binary_logits.shape, binary_logits.dtype, device) if compute_grad else binary_logits
        has_adj = logit_adjustment is not None
        adjustment = logit_adjustment.float().contiguous() if has_adj else logits
        config = _launch_config(num_classes)
        if batch:
            _ce_bdc_kernel[(triton.cdiv(batch, config["ROWS"]),)](
                logits, binary_logits, labels, normal_mask.to(torch.int8), adjustment,
                *per_row, grad_logits, grad_binary,
                batch, num_classes, logits.stride(0), binary_logits.stride(0), grad_logits.stride(0),
                grad_binary.stride(0), lambda_bin, lambda_bdc if args.bdc_grad_to_logits else 0.0,
                lambda_bdc if args.bdc_grad_to_binary else 0.0, 1.0 / batch,
                HAS_ADJ=has_adj, SYM_KL=bool(args.sym_kl), COMPUTE_GRAD=compute_grad, **config,
            )
        # These means over no rows (B = 0 launches nothing) are NaN, as the reference's are.
        ce, binary_ce, bdc = (x.mean() for x in per_row)
        total = ce + lambda_bin * binary_ce + lambda_bdc * bdc
        if compute_grad:
            ctx.save_for_backward(grad_logits, grad_binary)
        ctx.gradient_handed_out = False
        ctx.mark_non_differentiable(ce, binary_ce, bdc)
        return total, ce, binary_ce, bdc

    @staticmethod
    def backward(ctx, grad_total: Tensor, *_grad_terms: Tensor | None):
        # The gradient made in the forward is scaled in place and handed out, not copied
        # (as Liger-Kernel's cross-entropy does): a second backward would find it scaled.
        if ctx.gradient_handed_out:
            raise RuntimeError("fused_ce_bdc: backward ran twice through one forward (retain_graph); its gradient "
                               "buffer is scaled in place, so compute the loss again instead")
        ctx.gradient_handed_out = True
        grad_logits, grad_binary = ctx.saved_tensors
        return (
            grad_logits.mul_(grad_total) if ctx.needs_input_grad[0] else None,
            grad_binary.mul_(grad_total) if ctx.needs_input_grad[1] else None,
            None,
        )


def fused_ce_bdc(args: CEBDCArgs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Batch means (total, ce, binary_ce, bdc), float32, as `ce_bdc_reference` on the
    same `args` (shapes validated by the caller); only `total` has gradients (to the
    logits and the binary logits; the logit adjustment is treated as a constant)."""
    check_kernel_dtype("logits", args.logits)
    check_kernel_dtype("binary_logits", args.binary_logits)
    # Unit column stride is all the kernel needs: an aligned, padded row stride is kept.
    logits = args.logits if args.logits.stride(1) == 1 else args.logits.contiguous()
    return _CEBDCFunction.apply(logits, args.binary_logits.contiguous(), replace(args, labels=args.labels.contiguous()))
