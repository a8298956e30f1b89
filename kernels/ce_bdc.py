"""Fused CE + binary CE + BDC classifier loss: Triton kernel and its autograd Function.

Same contract and arguments (`specs.CEBDCArgs`) as
`jrcl_fast.losses.reference.ce_bdc_reference`. One program per few
rows reads the logits once to get every log-sum-exp the loss needs (adjusted logits,
normal group, abnormal group; the plain softmax normaliser is their log-add-exp)
and, when a gradient is wanted, a second time to write d total / d logits, as
Liger-Kernel's cross-entropy does: the gradient is produced in the forward and
only scaled, in place, by the incoming gradient in the backward.

The main loops run over every class alike, with no per-logit group routing: they
treat each class as abnormal, through a per-class bias of -inf on the normal classes
for the abnormal log-sum-exp, and the abnormal group's gradient formula. The normal
classes (a list made once per normal mask, usually a small part of C) get their own loops after
each main loop: pass 1 gathers their log-sum-exp, pass 2 rewrites their gradient.
Full blocks of classes load without masks (in 16-byte vectors when the row stride
allows); only the tail block and the gathers are masked.
"""

from __future__ import annotations

import math
import weakref
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
def _lanes(BLOCK: tl.constexpr, VEC: tl.constexpr):
    """0 .. BLOCK - 1 as 1 x BLOCK / VEC x VEC: vectors of VEC consecutive entries, each
    held by one thread (the block's tensors are rows x vectors x VEC)."""
    return tl.arange(0, BLOCK // VEC)[None, :, None] * VEC + tl.arange(0, VEC)[None, None, :]


@triton.jit
def _load_logits(z_ptr, z_rows, cols, ok, MASKED: tl.constexpr):
    """The logits of classes `cols` (vectors x VEC) in each row of `z_rows`, as float32
    (rows x vectors x VEC). MASKED loads the `ok` classes only, padding with -inf, which
    the log-sum-exps and exps below take as absent; full blocks load without masks."""
    ptrs = z_ptr + z_rows[:, None, None] + cols
    if MASKED:
        z = tl.load(ptrs, mask=ok, other=-float("inf"))
    else:
        z = tl.load(ptrs)
    return z.to(tl.float32)


@triton.jit
def _load_classes(ptr, cols, ok, MASKED: tl.constexpr):
    """A per-class float32 vector at `cols`, to broadcast over the rows."""
    if MASKED:
        return tl.load(ptr + cols, mask=ok, other=0.0)
    else:
        return tl.load(ptr + cols)


@triton.jit
def _lse_update(m, s, x):
    """Logits x (rows x vectors x VEC, -inf where absent) into running log-sum-exps kept
    per row and vector: m the max so far, s the sum of exp(x - m). Each vector sits in
    one thread, so its max and sum are register work; no value crosses threads until
    the loops are over. One exp per logit, and one per vector to rescale s."""
    m_new = tl.maximum(m, tl.max(x, 2))
    ref = tl.where(m_new == -float("inf"), 0.0, m_new)  # nothing seen yet: exp(-inf - 0) = 0, not NaN
    ref2 = ref * LOG2E
    s = s * fast_exp2(m * LOG2E - ref2) + tl.sum(fast_exp2(x * LOG2E - ref2[:, :, None]), 2)
    return m_new, s


@triton.jit
def _stats_block(
    z_ptr, z_rows, abnormal_bias_ptr, adj_ptr, cols, ok, max_a, sum_a, max_adj, sum_adj,
    HAS_ADJ: tl.constexpr, MASKED: tl.constexpr,
):
    """Pass 1's main loop on one block of classes: the running log-sum-exps of the
    abnormal group (the normal classes' bias of -inf leaves them out) and of the
    adjusted logits."""
    z = _load_logits(z_ptr, z_rows, cols, ok, MASKED)
    max_a, sum_a = _lse_update(max_a, sum_a, z + _load_classes(abnormal_bias_ptr, cols, ok, MASKED))
    if HAS_ADJ:
        max_adj, sum_adj = _lse_update(max_adj, sum_adj, z + _load_classes(adj_ptr, cols, ok, MASKED))
    return max_a, sum_a, max_adj, sum_adj


@triton.jit
def _normal_block(normal_idx_ptr, j):
    """Entries j of the normal classes' list (padded with -1 to whole blocks, so that it
    loads in vectors): their classes, and which are classes (the -1 are masked off)."""
    cols = tl.load(normal_idx_ptr + j)
    return cols, cols >= 0


@triton.jit
def _merge_lse(m, s):
    """Per-row (max, sum relative to it) from the per-vector running statistics."""
    top = tl.max(m, 1)
    ref = tl.where(top == -float("inf"), 0.0, top)
    return top, tl.sum(s * fast_exp2((m - ref[:, None]) * LOG2E), 1)


@triton.jit
def _grad_block(
    z_ptr, dz_ptr, z_rows, dz_rows, row_ok, adj_ptr, cols, ok, lse_group, coef_group, lse_adj,
    HAS_ADJ: tl.constexpr, MASKED: tl.constexpr,
):
    """Pass 2 on one block of classes of one group: d total / d z_c without the -1 of
    the label (written after the loops), coef_group softmax_group(z)_c plus, with an
    adjustment, CE's softmax(z + adj)_c (see the kernel): one exp per logit, two with
    an adjustment."""
    z = _load_logits(z_ptr, z_rows, cols, ok, MASKED)
    dz = coef_group[:, None, None] * fast_exp2(z * LOG2E - (lse_group * LOG2E)[:, None, None])
    if HAS_ADJ:
        z_adj = z + _load_classes(adj_ptr, cols, ok, MASKED)
        dz += fast_exp2(z_adj * LOG2E - (lse_adj * LOG2E)[:, None, None])
    mask = row_ok[:, None, None]
    if MASKED:
        mask = mask & ok
    tl.store(dz_ptr + dz_rows[:, None, None] + cols, dz.to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ce_bdc_kernel(
    z_ptr, b_ptr, y_ptr, abnormal_bias_ptr, normal_idx_ptr, n_normal_ptr, adj_ptr,
    ce_ptr, bce_ptr, bdc_ptr, dz_ptr, db_ptr,
    B, C, stride_z, stride_b, stride_dz, stride_db, lambda_bin, lambda_bdc_z, lambda_bdc_b, inv_batch,
    HAS_ADJ: tl.constexpr, SYM_KL: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr, NORMAL_BLOCK: tl.constexpr,
):
    # lambda_bdc_z and lambda_bdc_b are BDC's weight in the gradient of the logits and of
    # the binary head: lambda_bdc, or 0 where BDC's gradient to that head is stopped.
    # ROWS rows per program share the loads of the per-class vectors.
    # Rows past the batch read the last row again (no masks on the loads) and store nothing.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    rows = tl.minimum(rows, B - 1).to(tl.int64)
    z_rows = rows * stride_z
    # A block of classes as BLOCK_C / VEC vectors of VEC classes (16 bytes of logits),
    # each held by one thread.
    lanes = _lanes(BLOCK_C, VEC)
    # The normal classes: 4 entries of their list (one 16-byte vector of indices) per
    # thread, NORMAL_BLOCK a row and iteration, so that a group of a few classes costs little.
    normal_lanes = _lanes(NORMAL_BLOCK, 4)
    full = C - C % BLOCK_C  # classes covered by unmasked blocks
    n_normal = tl.load(n_normal_ptr)

    # Pass 1. Separate group sums keep log p_normal and log p_abnormal finite when either
    # mass underflows against the other.
    neg_inf = tl.full([ROWS, BLOCK_C // VEC], -float("inf"), tl.float32)
    zero = tl.zeros([ROWS, BLOCK_C // VEC], tl.float32)
    max_a, sum_a, max_adj, sum_adj = neg_inf, zero, neg_inf, zero
    for start in range(0, full, BLOCK_C):
        cols = start + lanes
        max_a, sum_a, max_adj, sum_adj = _stats_block(
            z_ptr, z_rows, abnormal_bias_ptr, adj_ptr, cols, cols < C, max_a, sum_a, max_adj, sum_adj,
            HAS_ADJ, False,
        )
    if full < C:
        cols = full + lanes
        max_a, sum_a, max_adj, sum_adj = _stats_block(
            z_ptr, z_rows, abnormal_bias_ptr, adj_ptr, cols, cols < C, max_a, sum_a, max_adj, sum_adj,
            HAS_ADJ, True,
        )
    max_n = tl.full([ROWS, NORMAL_BLOCK // 4], -float("inf"), tl.float32)
    sum_n = tl.zeros([ROWS, NORMAL_BLOCK // 4], tl.float32)
    for start in range(0, n_normal, NORMAL_BLOCK):
        cols, ok = _normal_block(normal_idx_ptr, start + normal_lanes)
        max_n, sum_n = _lse_update(max_n, sum_n, _load_logits(z_ptr, z_rows, cols, ok, True))
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
    abnormal = tl.load(abnormal_bias_ptr + label) == 0.0
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
        dz_rows = rows * stride_dz
        # Every class as abnormal first (on a normal class that value is meaningless, even
        # inf), then the normal classes' own term over it, then the label's -1 over that
        # (other threads of this program may have written the same class: the barriers
        # order the stores).
        for start in range(0, full, BLOCK_C):
            cols = start + lanes
            _grad_block(z_ptr, dz_ptr, z_rows, dz_rows, row_ok, adj_ptr, cols, cols < C,
                        lse_a, coef_a, lse_adj_scaled, HAS_ADJ, False)
        if full < C:
            cols = full + lanes
            _grad_block(z_ptr, dz_ptr, z_rows, dz_rows, row_ok, adj_ptr, cols, cols < C,
                        lse_a, coef_a, lse_adj_scaled, HAS_ADJ, True)
        tl.debug_barrier()
        for start in range(0, n_normal, NORMAL_BLOCK):
            cols, ok = _normal_block(normal_idx_ptr, start + normal_lanes)
            _grad_block(z_ptr, dz_ptr, z_rows, dz_rows, row_ok, adj_ptr, cols, ok,
                        lse_n, coef_n, lse_adj_scaled, HAS_ADJ, True)
        tl.debug_barrier()
        label_normal = abnormal == 0
        e_label = tl.exp(z_label - tl.where(label_normal, lse_n, lse_a))
        dz_label = e_label * tl.where(label_normal, coef_n, coef_a) - inv_batch
        if HAS_ADJ:
            dz_label += tl.exp(z_label + adj_label - lse_adj_scaled)
        tl.store(dz_ptr + rows * stride_dz + label, dz_label.to(dz_ptr.dtype.element_ty), mask=row_ok & label_ok)


def _launch_config(num_classes: int, element_size: int) -> dict[str, int]:
    """Blocks of up to 2048 classes (whole rows below that) and as many rows as make
    about 2048 logits per program, so short rows still fill one; VEC classes make one
    16-byte vector of logits. The normal classes go up to 512 a row and iteration (one
    vector of 4 indices per thread of the 4 warps), fewer for short rows."""
    block = min(triton.next_power_of_2(max(num_classes, 1)), 2048)
    rows = max(1, min(16, 2048 // block))
    return {"BLOCK_C": block, "ROWS": rows, "VEC": min(16 // element_size, block),
            "NORMAL_BLOCK": max(4, min(512, block)), "num_warps": 4}


# The last normal mask's groups, by the mask itself (a weak reference) and its version
# counter: training passes one and the same mask every step, so they are built once, not
# in about seven small launches per step; a new mask or an in-place change rebuilds them.
# (Writes that bypass the counter, through .data or a NumPy view, are not seen; inference
# tensors have no counter and are never cached.)
_last_groups: tuple[weakref.ref, int, int, tuple[Tensor, Tensor, Tensor]] | None = None


def _class_groups(normal_mask: Tensor, block: int) -> tuple[Tensor, Tensor, Tensor]:
    """The normal group as the kernel takes it: a bias of -inf on the normal classes (0
    elsewhere) that leaves them out of the abnormal log-sum-exp; their indices, ascending,
    then -1 up to a whole number of blocks; and their count. All stay on the device: no
    launch waits for them."""
    global _last_groups
    if normal_mask.is_inference():
        return _build_class_groups(normal_mask, block)
    if _last_groups is not None:
        mask_ref, version, last_block, groups = _last_groups
        if mask_ref() is normal_mask and version == normal_mask._version and last_block == block:
            return groups
    groups = _build_class_groups(normal_mask, block)
    _last_groups = (weakref.ref(normal_mask), normal_mask._version, block, groups)
    return groups


def _build_class_groups(normal_mask: Tensor, block: int) -> tuple[Tensor, Tensor, Tensor]:
    device, num_classes = normal_mask.device, normal_mask.shape[0]
    abnormal_bias = torch.zeros(num_classes, dtype=torch.float32, device=device).masked_fill_(normal_mask, -math.inf)
    n_normal = normal_mask.sum(dtype=torch.int32).reshape(1)
    normal_first = torch.argsort((~normal_mask).to(torch.uint8), stable=True).to(torch.int32)
    normal_idx = torch.full((triton.cdiv(num_classes, block) * block,), -1, dtype=torch.int32, device=device)
    normal_idx[:num_classes] = torch.where(torch.arange(num_classes, device=device) < n_normal, normal_first, -1)
    return abnormal_bias, normal_idx, n_normal


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
        labels, logit_adjustment = args.labels, args.logit_adjustment
        lambda_bin, lambda_bdc = float(args.lambda_bin), float(args.lambda_bdc)
        batch, num_classes = logits.shape
        device = logits.device
        compute_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        per_row = [new_buffer((batch,), torch.float32, device) for _ in range(3)]
        # Without a gradient the kernel never touches these; the pointers are placeholders.
        # The logits' gradient takes their row stride (the classifier pads its rows to a
        # multiple of LOGIT_ROW_ALIGNMENT = 8 classes, models/jrcl_net.py, and hands over an
        # aligned view), so both are read and written in 16-byte vectors.
        grad_logits = logits
        if compute_grad:
            # (At least C: an expanded batch of one row has row stride 0.)
            row_stride = max(logits.stride(0), num_classes)
            grad_logits = new_buffer((batch, row_stride), logits.dtype, device)[:, :num_classes]
        grad_binary = new_buffer(binary_logits.shape, binary_logits.dtype, device) if compute_grad else binary_logits
        has_adj = logit_adjustment is not None
        adjustment = logit_adjustment.float().contiguous() if has_adj else logits
        config = _launch_config(num_classes, logits.element_size())
        if batch:
            abnormal_bias, normal_idx, n_normal = _class_groups(args.normal_mask, config["NORMAL_BLOCK"])
            _ce_bdc_kernel[(triton.cdiv(batch, config["ROWS"]),)](
                z_ptr=logits, b_ptr=binary_logits, y_ptr=labels, abnormal_bias_ptr=abnormal_bias,
                normal_idx_ptr=normal_idx, n_normal_ptr=n_normal, adj_ptr=adjustment,
                ce_ptr=per_row[0], bce_ptr=per_row[1], bdc_ptr=per_row[2], dz_ptr=grad_logits, db_ptr=grad_binary,
                B=batch, C=num_classes, stride_z=logits.stride(0), stride_b=binary_logits.stride(0),
                stride_dz=grad_logits.stride(0), stride_db=grad_binary.stride(0), lambda_bin=lambda_bin,
                lambda_bdc_z=lambda_bdc if args.bdc_grad_to_logits else 0.0,
                lambda_bdc_b=lambda_bdc if args.bdc_grad_to_binary else 0.0, inv_batch=1.0 / batch,
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
