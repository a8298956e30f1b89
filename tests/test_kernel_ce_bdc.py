"""Fused CE + binary CE + BDC kernel against the PyTorch reference and a float64
brute force built from probabilities (not log-sum-exps), one row at a time.

On CPU the kernel runs under the Triton interpreter (conftest sets TRITON_INTERPRET).
Every run starts from a fresh random seed (printed, so a failure can be replayed)
and with the kernel's output buffers poisoned with NaN, so matching the reference
proves every element was written.
"""

from __future__ import annotations

import pytest
import torch
from conftest import requires_gpu
from kernel_testing import assert_close_to_largest, compile_for_sm90, poisoned_random_run  # noqa: F401 (autouse fixture)
from torch import Tensor

from jrcl_fast.config import DIVERGENCES
from jrcl_fast.kernels import ce_bdc
from jrcl_fast.kernels.ce_bdc import fused_ce_bdc
from jrcl_fast.kernels.specs import CEBDCArgs
from jrcl_fast.losses import ce_bdc_loss
from jrcl_fast.losses.reference import ce_bdc_reference

LAMBDA_BIN, LAMBDA_BDC = 0.7, 1.3


def brute_force(
    logits: Tensor, binary_logits: Tensor, labels: list[int], normal: list[bool], adjustment: Tensor | None, divergence: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The definitions in float64, row by row, from probabilities: float64 keeps the
    group masses of logits in the hundreds (e^-300) above underflow."""
    normal_idx = [c for c, is_normal in enumerate(normal) if is_normal]
    abnormal_idx = [c for c, is_normal in enumerate(normal) if not is_normal]
    ce, binary_ce, bdc = [], [], []
    for row, y in enumerate(labels):
        z = logits[row]
        shifted = z if adjustment is None else z + adjustment
        ce.append(-torch.log(torch.softmax(shifted, 0)[y]))
        q = torch.softmax(binary_logits[row], 0)
        binary_ce.append(-torch.log(q[0] if normal[y] else q[1]))
        p = torch.softmax(z, 0)
        pi = torch.stack([p[normal_idx].sum(), p[abnormal_idx].sum()])
        if divergence == "js":
            m = (pi + q) / 2
            bdc.append(0.5 * (pi * torch.log(pi / m)).sum() + 0.5 * (q * torch.log(q / m)).sum())
        else:
            bdc.append(((pi - q) * torch.log(pi / q)).sum())
    ce, binary_ce, bdc = (torch.stack(x).mean() for x in (ce, binary_ce, bdc))
    return ce + LAMBDA_BIN * binary_ce + LAMBDA_BDC * bdc, ce, binary_ce, bdc


def random_problem(batch: int, num_classes: int, scale: float, device: str, dtype: torch.dtype = torch.float32):
    """Logits of spread `scale` (40 saturates both heads), a random normal group with
    at least one class on each side, labels leaving most classes absent when C > B."""
    logits = (scale * torch.randn(batch, num_classes, device=device)).to(dtype)
    binary_logits = (scale * torch.randn(batch, 2, device=device)).to(dtype)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    normal_mask = torch.rand(num_classes, device=device) < 0.4
    normal_mask[torch.randperm(num_classes, device=device)[:2]] = torch.tensor([True, False], device=device)
    return logits, binary_logits, labels, normal_mask


def run_with_grads(fn, logits: Tensor, binary_logits: Tensor, labels: Tensor, normal_mask: Tensor,
                   adjustment: Tensor | None, divergence: str, upstream: float):
    z = logits.detach().clone().requires_grad_()
    b = binary_logits.detach().clone().requires_grad_()
    out = fn(CEBDCArgs(z, b, labels, normal_mask, adjustment, LAMBDA_BIN, LAMBDA_BDC, sym_kl=divergence == "sym_kl"))
    (upstream * out[0]).backward()
    return [x.detach() for x in out], z.grad, b.grad


# (B, C, logit spread): B = 1; C > B (absent classes); 40 saturates; C = 2500 spans a full
# block and a masked tail; C = 64 is whole blocks only; B = 37 and 19 end in a partial row group.
CASES = [(1, 20, 1.0), (37, 20, 3.0), (53, 365, 3.0), (29, 365, 40.0), (23, 20, 40.0), (5, 2500, 3.0), (19, 64, 3.0)]


@pytest.mark.parametrize("divergence", ["js", "sym_kl"])
@pytest.mark.parametrize("adjusted", [False, True])
@pytest.mark.parametrize("batch,num_classes,scale", CASES)
def test_matches_reference_and_brute_force(
    batch: int, num_classes: int, scale: float, adjusted: bool, divergence: str, device: str
) -> None:
    logits, binary_logits, labels, normal_mask = random_problem(batch, num_classes, scale, device)
    adjustment = torch.randn(num_classes, device=device) if adjusted else None
    upstream = torch.empty(()).uniform_(0.5, 2.0).item()
    values, grad_z, grad_b = run_with_grads(fused_ce_bdc, logits, binary_logits, labels, normal_mask, adjustment, divergence, upstream)
    for x in (*values, grad_z, grad_b):
        assert torch.isfinite(x).all()
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in values)

    ref_values, ref_z, ref_b = run_with_grads(ce_bdc_reference, logits, binary_logits, labels, normal_mask, adjustment, divergence, upstream)
    # The kernel takes exp(x) as exp2(x * log2 e), like CUDA's fast exp: rounding the
    # product costs a relative error of about |x| * 2^-24 * log2 e, which saturated
    # logits (spread 40, |x| up to ~4 x 40) lift past 1e-5 (seen: 1.3e-5 against float64,
    # 1 seed in 300). The tolerance follows the spread instead of being loosened for all.
    rtol = max(1e-5, 2 * (4 * scale) * 2.0**-24 * 1.4427)  # |x| <= ~4 x spread, twice the bound
    for got, want in zip((*values, grad_z, grad_b), (*ref_values, ref_z, ref_b)):
        torch.testing.assert_close(got, want, rtol=rtol, atol=1e-6)

    z64 = logits.double().cpu().requires_grad_()
    b64 = binary_logits.double().cpu().requires_grad_()
    adj64 = adjustment.double().cpu() if adjusted else None
    bf = brute_force(z64, b64, labels.tolist(), normal_mask.tolist(), adj64, divergence)
    bf_z, bf_b = torch.autograd.grad(upstream * bf[0], (z64, b64))
    for got, want in zip((*values, grad_z, grad_b), (*(v.detach() for v in bf), bf_z, bf_b)):
        torch.testing.assert_close(got.double().cpu(), want, rtol=rtol, atol=1e-6)


def test_normal_groups_are_built_once_per_mask_and_rebuilt_when_it_changes(
    device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training passes one normal mask every step: its groups are built on the first
    call only. A change to the mask in place, or another mask, rebuilds them; stale
    groups would give a wrong loss without an error."""
    logits, binary_logits, labels, normal_mask = random_problem(11, 40, 3.0, device)
    build, builds = ce_bdc._build_class_groups, []
    monkeypatch.setattr(ce_bdc, "_last_groups", None)
    monkeypatch.setattr(ce_bdc, "_build_class_groups", lambda mask, block: builds.append(block) or build(mask, block))

    def matches_reference(mask: Tensor) -> None:
        args = CEBDCArgs(logits, binary_logits, labels, mask, None, LAMBDA_BIN, LAMBDA_BDC)
        for got, want in zip(fused_ce_bdc(args), ce_bdc_reference(args)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    matches_reference(normal_mask)
    matches_reference(normal_mask)
    assert len(builds) == 1
    normal_mask.logical_not_()  # both groups stay non-empty
    matches_reference(normal_mask)
    assert len(builds) == 2
    matches_reference(normal_mask.clone())
    assert len(builds) == 3
    with torch.inference_mode():  # no version counter: built every time
        inference_mask = normal_mask.clone()
        matches_reference(inference_mask)
        matches_reference(inference_mask)
    assert len(builds) == 5


def test_without_gradients_only_values(device: str) -> None:
    logits, binary_logits, labels, normal_mask = random_problem(17, 20, 3.0, device)
    values = fused_ce_bdc(CEBDCArgs(logits, binary_logits, labels, normal_mask, None, LAMBDA_BIN, LAMBDA_BDC))
    assert not any(v.requires_grad for v in values)
    for got, want in zip(values, ce_bdc_reference(CEBDCArgs(logits, binary_logits, labels, normal_mask, None, LAMBDA_BIN, LAMBDA_BDC))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_padded_logits_view_keeps_its_stride(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits handed over as a view of a classifier padded to 24 columns: the kernel
    reads the view itself (no copy) and writes the gradient into a buffer of the same
    row stride; the results match the reference."""
    logits, binary_logits, labels, normal_mask = random_problem(21, 20, 3.0, device)
    padded = torch.randn(21, 24, device=device)
    padded[:, :20] = logits
    view = padded[:, :20].requires_grad_()
    adjustment = torch.randn(20, device=device)
    launched = []  # the logits and their gradient buffer as the kernel gets them

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append((kwargs["z_ptr"], kwargs["dz_ptr"]))
                return kernel[grid](*args, **kwargs)
            return launch

    kernel = ce_bdc._ce_bdc_kernel
    monkeypatch.setattr(ce_bdc, "_ce_bdc_kernel", Spy())
    total, *terms = fused_ce_bdc(CEBDCArgs(view, binary_logits, labels, normal_mask, adjustment, LAMBDA_BIN, LAMBDA_BDC))
    (1.5 * total).backward()
    [(z, dz)] = launched
    assert z.data_ptr() == padded.data_ptr() and z.stride() == (24, 1)
    assert dz.stride() == (24, 1)
    want = run_with_grads(ce_bdc_reference, logits, binary_logits, labels, normal_mask, adjustment, "js", 1.5)
    for g, w in zip((total, *terms, view.grad), (*want[0], want[1])):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_rows_expanded_from_one(device: str) -> None:
    """Logits with row stride 0 (one row expanded to a batch) are read as they are, and
    their gradient still gets a row of its own per sample."""
    logits, binary_logits, labels, normal_mask = random_problem(6, 20, 3.0, device)
    row = logits[:1].clone().requires_grad_()
    total = fused_ce_bdc(CEBDCArgs(row.expand(6, 20), binary_logits, labels, normal_mask))[0]
    total.backward()
    ref_row = logits[:1].clone().requires_grad_()
    ce_bdc_reference(CEBDCArgs(ref_row.expand(6, 20), binary_logits, labels, normal_mask))[0].backward()
    torch.testing.assert_close(row.grad, ref_row.grad, rtol=1e-5, atol=1e-6)


def test_label_out_of_range_makes_the_loss_nan(device: str) -> None:
    """On the GPU the label range is not checked on the host (that would wait for the
    device): a label outside [0, C) must then give a NaN loss, never a finite wrong one."""
    logits, binary_logits, labels, normal_mask = random_problem(9, 20, 3.0, device)
    for bad in (20, -1):
        labels[4] = bad
        total, ce, _, _ = fused_ce_bdc(CEBDCArgs(logits, binary_logits, labels, normal_mask))
        assert torch.isnan(total) and torch.isnan(ce)


def test_terms_are_logging_only_and_a_second_backward_is_refused(device: str) -> None:
    """Only `total` is differentiable; the gradient is scaled in place in the backward,
    so a second backward through a retained graph raises instead of scaling it twice."""
    logits, binary_logits, labels, normal_mask = random_problem(17, 20, 3.0, device)
    z = logits.clone().requires_grad_()
    total, *terms = fused_ce_bdc(CEBDCArgs(z, binary_logits, labels, normal_mask, lambda_bin=LAMBDA_BIN, lambda_bdc=LAMBDA_BDC))
    assert total.requires_grad and not any(t.requires_grad for t in terms)
    (3.0 * total).backward(retain_graph=True)
    first = z.grad.clone()
    with pytest.raises(RuntimeError, match="backward ran twice"):
        (3.0 * total).backward()
    ref = logits.clone().requires_grad_()
    (3.0 * ce_bdc_reference(CEBDCArgs(ref, binary_logits, labels, normal_mask, None, LAMBDA_BIN, LAMBDA_BDC))[0]).backward()
    torch.testing.assert_close(first, ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", ["js", "sym_kl"])
def test_public_dispatch_matches_torch(divergence: str, device: str) -> None:
    logits, binary_logits, labels, normal_mask = random_problem(41, 365, 3.0, device)
    adjustment = torch.randn(365, device=device)
    results = {}
    for backend in ("triton", "torch"):
        z = logits.clone().requires_grad_()
        b = binary_logits.clone().requires_grad_()
        out = ce_bdc_loss(z, b, labels, normal_mask, adjustment, LAMBDA_BIN, LAMBDA_BDC, divergence, backend=backend)
        out.total.backward()
        results[backend] = (*out, z.grad, b.grad)
    for got, want in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stop", ["classifier", "binary"])
@pytest.mark.parametrize("adjusted", [False, True])
def test_bdc_stop_grad_matches_torch(stop: str, adjusted: bool, device: str) -> None:
    """loss.bdc_stop_grad through the public function: the kernel's gradients match the
    reference's, and the stopped head's gradient differs from the unstopped one."""
    logits, binary_logits, labels, normal_mask = random_problem(29, 40, 3.0, device)
    adjustment = torch.randn(40, device=device) if adjusted else None
    results = {}
    for backend, option in (("triton", stop), ("torch", stop), ("torch", "none")):
        z, b = logits.clone().requires_grad_(), binary_logits.clone().requires_grad_()
        out = ce_bdc_loss(z, b, labels, normal_mask, adjustment, LAMBDA_BIN, LAMBDA_BDC, backend=backend,
                          bdc_stop_grad=option)
        out.total.backward()
        results[backend, option] = (*out, z.grad, b.grad)
    for got, want in zip(results["triton", stop], results["torch", stop]):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    stopped = 4 if stop == "classifier" else 5  # the logits' or the binary head's gradient
    assert not torch.allclose(results["torch", stop][stopped], results["torch", "none"][stopped])
    assert torch.equal(results["torch", stop][9 - stopped], results["torch", "none"][9 - stopped])


def test_empty_batch_as_the_reference(device: str) -> None:
    """B = 0: the reference's means over no rows are NaN (torch's mean of nothing) and
    its gradients empty; the kernel path gives the same."""
    _, _, _, normal_mask = random_problem(1, 20, 1.0, device)
    logits, binary_logits = torch.zeros(0, 20, device=device), torch.zeros(0, 2, device=device)
    labels = torch.zeros(0, dtype=torch.long, device=device)
    results = {}
    for backend in ("triton", "torch"):
        z, b = logits.clone().requires_grad_(), binary_logits.clone().requires_grad_()
        out = ce_bdc_loss(z, b, labels, normal_mask, None, LAMBDA_BIN, LAMBDA_BDC, backend=backend)
        out.total.backward()
        results[backend] = (*out, z.grad, b.grad)
    assert all(torch.isnan(v) for v in results["torch"][:4])
    for got, want in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got.detach(), want.detach(), equal_nan=True)


def test_rejects_float64(device: str) -> None:
    logits, binary_logits, labels, normal_mask = random_problem(4, 20, 1.0, device, torch.float64)
    with pytest.raises(TypeError, match="float64"):
        fused_ce_bdc(CEBDCArgs(logits, binary_logits, labels, normal_mask))


def test_unknown_divergence_is_refused_before_the_kernel(device: str) -> None:
    """The kernel only knows a flag; the name a user writes is checked in losses/."""
    logits, binary_logits, labels, normal_mask = random_problem(4, 20, 1.0, device)
    with pytest.raises(ValueError, match=r"^divergence must be one of 'js', 'sym_kl', got 'kl'$"):
        ce_bdc_loss(logits, binary_logits, labels, normal_mask, divergence="kl", backend="triton")


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("scale", [3.0, 40.0])
def test_half_precision_inputs(dtype: torch.dtype, tol: float, scale: float, device: str) -> None:
    """Float32 losses, gradients in the input dtype, saturated logits included."""
    logits, binary_logits, labels, normal_mask = random_problem(33, 365, scale, device, dtype)
    adjustment = torch.randn(365, device=device)
    got = run_with_grads(fused_ce_bdc, logits, binary_logits, labels, normal_mask, adjustment, "js", 1.0)
    want = run_with_grads(ce_bdc_reference, logits, binary_logits, labels, normal_mask, adjustment, "js", 1.0)
    assert_close_to_largest((*got[0], got[1], got[2]), (*want[0], want[1], want[2]), tol)


def test_kernel_compiles_for_sm90() -> None:
    """The kernel through the real compiler for each dtype and variant in use."""
    requests = []
    for dtype, num_classes, has_adj, sym_kl, grad in (
        ("fp32", 365, True, False, True), ("bf16", 8142, False, True, True), ("fp16", 8142, True, False, False)
    ):
        shape = {"n": 4096, "classes": num_classes, "dtype": dtype, "stride": num_classes}
        requests.append(("ce_bdc", shape, {"HAS_ADJ": has_adj, "SYM_KL": sym_kl, "COMPUTE_GRAD": grad}))
    compile_for_sm90(requests)


@requires_gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("divergence", ["js", "sym_kl"])
@pytest.mark.parametrize("num_classes,scale", [(365, 3.0), (8142, 3.0), (8142, 40.0)])
def test_compiled_gpu(dtype: torch.dtype, tol: float, divergence: str, num_classes: int, scale: float) -> None:
    """Compiled kernel at training-like sizes, half precision included."""
    logits, binary_logits, labels, normal_mask = random_problem(4096, num_classes, scale, "cuda", dtype)
    adjustment = torch.randn(num_classes, device="cuda")
    got = run_with_grads(fused_ce_bdc, logits, binary_logits, labels, normal_mask, adjustment, divergence, 1.0)
    want = run_with_grads(ce_bdc_reference, logits, binary_logits, labels, normal_mask, adjustment, divergence, 1.0)
    assert_close_to_largest((*got[0], got[1], got[2]), (*want[0], want[1], want[2]), tol)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergence_names_reach_the_kernel_as_the_right_flag(name):
    """The fused kernel, called through the name, matches the reference of that name."""
    torch.manual_seed(torch.seed() % 2**31)
    logits, binary = torch.randn(6, 5) * 3, torch.randn(6, 2) * 3
    labels, normal = torch.randint(0, 5, (6,)), torch.tensor([True, False, False, True, False])
    fused = ce_bdc_loss(logits, binary, labels, normal, divergence=name, backend="triton")
    reference = ce_bdc_loss(logits.double(), binary.double(), labels, normal, divergence=name, backend="torch")
    torch.testing.assert_close(fused.bdc.double(), reference.bdc, rtol=1e-5, atol=1e-6)
    other = next(d for d in DIVERGENCES if d != name)
    assert not torch.allclose(reference.bdc, ce_bdc_loss(logits.double(), binary.double(), labels, normal,
                                                         divergence=other, backend="torch").bdc)
