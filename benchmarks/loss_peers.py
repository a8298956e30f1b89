"""The peers of the JRCL loss kernels, each on the problem it solves that is closest to ours:
Inf-CL, Liger-Kernel and Cut Cross-Entropy (the `[peers]` extra of setup.py pins them).

Each problem names what the peer computes and what ours computes on the same inputs, the
timed calls of both, and the checks that the quantities compared agree: the peer and our
public loss function, each restricted to the quantity they share, against one float64
reference. `bench_losses.py --peers` times the problems on a GPU and runs the checks
everywhere; where a peer's kernels cannot run on a CPU the check says why, and checks the
peer's own CPU stand-in (its PyTorch implementation, or its wrapper around the kernel)
instead.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor

from jrcl_fast.losses import ce_bdc_loss, one_to_all_supcon
from jrcl_fast.losses.reference import divergence_per_row
from jrcl_fast.models.jrcl_net import class_logits

# The versions the [peers] extra pins (setup.py) and these rows were written against.
PEER_VERSIONS = {"inf-cl": "1.2.1", "liger-kernel": "0.8.5", "cut-cross-entropy": "25.1.1"}
PEER_MODULES = {"inf-cl": "inf_cl", "liger-kernel": "liger_kernel", "cut-cross-entropy": "cut_cross_entropy"}
DIM = 128  # O2A's feature width, as bench_losses.py
CLASSIFIER_DIM = 2048  # RN50's feature width: the classifier matmul CCE fuses
TEMPERATURE = 0.1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

Inputs = tuple[Tensor, ...]
Setup = Callable[[int, int, str, str], tuple[Inputs, Inputs]]  # (n, classes, dtype, device) -> (inputs, wrt)


def missing_peers() -> list[str]:
    """The peers of PEER_VERSIONS that do not import here, as pip names."""
    return [name for name, module in PEER_MODULES.items() if importlib.util.find_spec(module) is None]


def installed_versions() -> dict[str, str | None]:
    versions = {}
    for name in PEER_VERSIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def peer(module: str, name: str) -> Callable:
    """A peer's function, imported on first use. On a CPU its Triton kernels run under the
    interpreter: TRITON_INTERPRET=1 before Triton is first imported (bench_losses.py and
    the tests' conftest.py set it)."""
    return getattr(importlib.import_module(module), name)


# --- Inf-CL: the N x N similarity and log-sum-exp of InfoNCE, one positive per row ---

def pairs_setup(n: int, classes: int, dtype: str, device: str) -> tuple[Inputs, Inputs]:
    """N unit-norm features in pairs (rows 2i and 2i+1 share a label): every row has one
    positive, its partner. No prototypes: `classes` is unused."""
    features = F.normalize(torch.randn(n, DIM, device=device), dim=1).to(DTYPES[dtype]).requires_grad_()
    labels = torch.arange(n, device=device) // 2
    return (features, labels), (features,)


def infcl_loss(features: Tensor, labels: Tensor) -> Tensor:
    """Inf-CL's tiled InfoNCE with the features as queries and as keys, the partner as the
    positive, scale 1/tau, and its head dimension set to D (the features are viewed in
    chunks of head_dim; its default, 256, does not divide D = 128). It upcasts to float32
    itself and keeps the query's own key in the log-sum-exp: it has no self mask."""
    cal_flash_loss = peer("inf_cl", "cal_flash_loss")
    partner = torch.arange(features.shape[0], device=features.device) ^ 1
    return cal_flash_loss(features, features, partner, scale=1 / TEMPERATURE, head_dim=DIM).mean()


class TorchLogSumExp:
    """Stand-in for Inf-CL's FlashProb (Triton, CUDA only): the same log-sum-exp over
    every key, (M, heads, d) x (N, heads, d) -> M, in PyTorch."""

    @staticmethod
    def apply(q: Tensor, k: Tensor) -> Tensor:
        return torch.logsumexp(torch.einsum("mhd,nhd->mn", q, k), dim=1)


def infcl_wrapper_on_cpu(features: Tensor, labels: Tensor) -> Tensor:
    """infcl_loss through Inf-CL's own wrapper (the views by head dimension, the scale, the
    positive's logit) with only its Triton log-sum-exp replaced: what a CPU can check."""
    flash = importlib.import_module("inf_cl.flash")
    with mock.patch.object(flash, "FlashProb", TorchLogSumExp):
        return infcl_loss(features, labels)


def o2a_one_positive(features: Tensor, labels: Tensor) -> Tensor:
    """Ours on the same problem: O2A with no prototypes and without class averaging (plain
    SupCon), so with one positive per row it is InfoNCE over every key but the anchor."""
    return one_to_all_supcon(features, labels, None, TEMPERATURE, class_average=False)


def info_nce(features: Tensor, labels: Tensor, self_in_denominator: bool) -> Tensor:
    """InfoNCE of each row against its partner (the other row of its label), in the input's
    precision: the reference both sides are checked against."""
    sim = features @ features.T / TEMPERATURE
    n = sim.shape[0]
    if not self_in_denominator:
        sim = sim.masked_fill(torch.eye(n, dtype=torch.bool, device=sim.device), -math.inf)
    rows = torch.arange(n, device=sim.device)
    return (torch.logsumexp(sim, dim=1) - sim[rows, rows ^ 1]).mean()


# --- Liger-Kernel: cross-entropy and JSD over N x C ---

def ce_bdc_setup(n: int, classes: int, dtype: str, device: str) -> tuple[Inputs, Inputs]:
    """As bench_losses.ce_bdc_setup: the model's padded logit rows, a binary head, labels,
    the normal classes (the first third) and a logit adjustment (log priors)."""
    from bench_losses import Case
    from bench_losses import ce_bdc_setup as setup

    return setup(Case("ce_bdc", n, classes, dtype), device)


def liger_ce(logits: Tensor, binary_logits: Tensor, labels: Tensor, normal_mask: Tensor,
             adjustment: Tensor) -> Tensor:
    """Liger's cross-entropy of the logits alone. Its forward computes the gradient too and
    writes it over the logits, in place (the inputs of a timed call are overwritten, which
    changes no work per call)."""
    return peer("liger_kernel.transformers.functional", "liger_cross_entropy")(logits, labels)


def ours_ce_bdc(logits: Tensor, binary_logits: Tensor, labels: Tensor, normal_mask: Tensor,
                adjustment: Tensor) -> Tensor:
    """Ours: CE (logit-adjusted) + binary CE + BDC (JS), the training objective."""
    return ce_bdc_loss(logits, binary_logits, labels, normal_mask, adjustment).total


def ours_ce_only(logits: Tensor, binary_logits: Tensor, labels: Tensor, normal_mask: Tensor,
                 adjustment: Tensor) -> Tensor:
    """Ours restricted to plain CE: no adjustment, lambda_bin = lambda_bdc = 0."""
    return ce_bdc_loss(logits, binary_logits, labels, normal_mask, None, lambda_bin=0.0, lambda_bdc=0.0).total


def ce_reference(logits: Tensor, binary_logits: Tensor, labels: Tensor, normal_mask: Tensor,
                 adjustment: Tensor) -> Tensor:
    return F.cross_entropy(logits, labels)


def distributions_setup(n: int, classes: int, dtype: str, device: str) -> tuple[Inputs, Inputs]:
    """Two N x C log-distributions (the first trained) and the CE+BDC inputs of our row."""
    (logits, binary_logits, labels, normal_mask, adjustment), wrt = ce_bdc_setup(n, classes, dtype, device)
    log_q = F.log_softmax(torch.randn(n, classes, device=device), 1).to(DTYPES[dtype]).requires_grad_()
    log_p = F.log_softmax(2 * torch.randn(n, classes, device=device), 1).to(DTYPES[dtype])
    return (log_q, log_p, logits, binary_logits, labels, normal_mask, adjustment), (log_q, *wrt)


def liger_jsd(log_q: Tensor, log_p: Tensor, *ce_bdc_inputs: Tensor) -> Tensor:
    """Liger's JSD (beta = 0.5: Jensen-Shannon), summed over C and averaged over rows; its
    gradient goes to the first argument only."""
    return peer("liger_kernel.transformers.functional", "liger_jsd")(log_q, log_p)


def ours_ce_bdc_beside_jsd(log_q: Tensor, log_p: Tensor, *ce_bdc_inputs: Tensor) -> Tensor:
    return ours_ce_bdc(*ce_bdc_inputs)


def js_reference(log_q: Tensor, log_p: Tensor, *ce_bdc_inputs: Tensor) -> Tensor:
    """BDC's Jensen-Shannon divergence (our reference's definition), here over C classes."""
    return divergence_per_row(log_p, log_q, sym_kl=False).mean()


# --- Cut Cross-Entropy: the classifier matmul fused into the loss ---

def classifier_setup(n: int, classes: int, dtype: str, device: str) -> tuple[Inputs, Inputs]:
    """Features (N x 2048), the classifier's weights (C x 2048) and the binary head's (2 x
    2048), scaled so that the logits have unit variance; labels, normal classes, log priors."""
    kind = DTYPES[dtype]
    features = torch.randn(n, CLASSIFIER_DIM, device=device).to(kind).requires_grad_()
    weight = (torch.randn(classes, CLASSIFIER_DIM, device=device) / CLASSIFIER_DIM**0.5).to(kind).requires_grad_()
    binary_weight = (torch.randn(2, CLASSIFIER_DIM, device=device) / CLASSIFIER_DIM**0.5).to(kind).requires_grad_()
    labels = torch.randint(0, classes, (n,), device=device)
    normal_mask = torch.arange(classes, device=device) < max(1, classes // 3)
    adjustment = torch.log_softmax(torch.randn(classes, device=device), 0)
    return (features, weight, binary_weight, labels, normal_mask, adjustment), (features, weight, binary_weight)


def cce_loss(features: Tensor, weight: Tensor, binary_weight: Tensor, labels: Tensor, normal_mask: Tensor,
             adjustment: Tensor, impl: str = "cce") -> Tensor:
    """CCE's linear_cross_entropy: CE of features @ weight.T without forming the logits,
    at its default gradient filtering (filter_eps="high")."""
    return peer("cut_cross_entropy", "linear_cross_entropy")(features, weight, labels, impl=impl)


def cce_torch_on_cpu(*inputs: Tensor) -> Tensor:
    """CCE through its other implementation (its enum's TORCH_COMPILE): what a CPU can run."""
    return cce_loss(*inputs, impl="torch_compile")


def ours_classifier(features: Tensor, weight: Tensor, binary_weight: Tensor, labels: Tensor, normal_mask: Tensor,
                    adjustment: Tensor, lambdas: float = 1.0) -> Tensor:
    """Ours: the model's classifier matmul (logit rows padded as the model pads them), the
    binary head, then CE+BDC; `lambdas=0` with no adjustment restricts it to plain CE."""
    logits = class_logits(features, weight)
    adjust = adjustment if lambdas else None
    return ce_bdc_loss(logits, F.linear(features, binary_weight), labels, normal_mask, adjust,
                       lambda_bin=lambdas, lambda_bdc=lambdas).total


def ours_classifier_ce_only(*inputs: Tensor) -> Tensor:
    return ours_classifier(*inputs, lambdas=0.0)


def linear_ce_reference(features: Tensor, weight: Tensor, binary_weight: Tensor, labels: Tensor, *rest: Tensor
                        ) -> Tensor:
    return F.cross_entropy(features @ weight.T, labels)


@dataclass(frozen=True)
class Check:
    """`fn` and `reference` compute the same scalar from the problem's inputs; the check
    compares the value and its gradient to every input of `wrt` that `fn` depends on
    (`grads` of them, in order). Where `gpu_only` gives the reason the peer's kernels
    cannot run on a CPU, `cpu_fn` (if any) is the peer's own stand-in checked there."""

    claim: str
    fn: Callable[..., Tensor]
    reference: Callable[..., Tensor]
    grads: int = 1
    gpu_only: str | None = None
    cpu_fn: Callable[..., Tensor] | None = None
    cpu_claim: str = ""


@dataclass(frozen=True)
class Problem:
    name: str
    peer: str  # pip name
    peer_computes: str  # the row's label: what the peer's number is for
    ours_computes: str
    setup: Setup
    peer_fn: Callable[..., Tensor]
    ours_fn: Callable[..., Tensor]
    peer_wrt: int  # the leading inputs of wrt that the peer's backward reaches
    element: str  # what "per element" counts
    elements: Callable[[int, int], int]
    classes_used: bool
    checks: tuple[Check, ...]


INFCL_GPU_ONLY = ("Inf-CL asserts CUDA tensors (inf_cl/flash.py) and rounds to TF32 with inline PTX, which the "
                  "Triton interpreter cannot run")
CCE_GPU_ONLY = ("CCE's Triton kernels call libdevice (log1p) and read the CUDA device's capability for their "
                "tiles; the Triton interpreter stops in its LSE forward")

PROBLEMS = (
    Problem(
        "infonce_vs_o2a", "inf-cl",
        "Inf-CL cal_flash_loss: InfoNCE, features as queries and keys, N x N similarities (query's own key kept "
        "in the log-sum-exp), head_dim = D = 128, float32 whatever the input dtype",
        "O2A via one_to_all_supcon: no prototypes, class_average off, labels in pairs (one positive per row), "
        "N x N similarities, self masked",
        pairs_setup, infcl_loss, o2a_one_positive, 1, "similarity", lambda n, c: n * n, False,
        (Check("Inf-CL = InfoNCE with the query's own key in the log-sum-exp (float64)", infcl_loss,
               lambda f, y: info_nce(f, y, self_in_denominator=True), gpu_only=INFCL_GPU_ONLY,
               cpu_fn=infcl_wrapper_on_cpu,
               cpu_claim="Inf-CL's wrapper (head_dim = 128 views, scale, positive) with its LSE kernel in PyTorch = "
                         "InfoNCE with self (float64)"),
         Check("ours (O2A, one positive per row, no prototypes, plain) = InfoNCE without self (float64)",
               o2a_one_positive, lambda f, y: info_nce(f, y, self_in_denominator=False)))),
    Problem(
        "ce_vs_ce_bdc", "liger-kernel",
        "Liger cross_entropy: CE of the N x C logits only (no logit adjustment, binary CE or BDC); gradient "
        "computed in its forward, written over the logits",
        "CE+BDC via ce_bdc_loss: logit-adjusted CE + binary CE + BDC (JS) on the model's padded logit rows",
        ce_bdc_setup, liger_ce, ours_ce_bdc, 1, "logit", lambda n, c: n * c, True,
        (Check("Liger CE = CE (float64)", liger_ce, ce_reference),
         Check("ours with lambda_bin = lambda_bdc = 0, no adjustment = CE (float64)", ours_ce_only, ce_reference))),
    Problem(
        "jsd_vs_ce_bdc", "liger-kernel",
        "Liger jsd: JS divergence over C classes of two given N x C log-distributions, gradient to one (BDC's JS "
        "is over 2 masses derived from the logits)",
        "CE+BDC via ce_bdc_loss, as above",
        distributions_setup, liger_jsd, ours_ce_bdc_beside_jsd, 1, "logit", lambda n, c: n * c, True,
        (Check("Liger JSD = our JS definition (reference.divergence_per_row) over C classes (float64)", liger_jsd,
               js_reference),)),
    Problem(
        "linear_ce_vs_classifier_ce_bdc", "cut-cross-entropy",
        "CCE linear_cross_entropy (impl cce): CE of features @ W^T, D = 2048, logits never formed; no logit "
        "adjustment, binary head or BDC; default gradient filtering",
        "class_logits matmul (padded rows) + binary head matmul + ce_bdc_loss, D = 2048",
        classifier_setup, cce_loss, ours_classifier, 2, "logit", lambda n, c: n * c, True,
        (Check("CCE = CE of features @ W^T (float64)", cce_loss, linear_ce_reference, grads=2,
               gpu_only=CCE_GPU_ONLY, cpu_fn=cce_torch_on_cpu,
               cpu_claim="CCE's TORCH_COMPILE implementation = CE of features @ W^T (float64)"),
         Check("ours (matmul + CE+BDC, lambdas 0, no adjustment) = CE of features @ W^T (float64)",
               ours_classifier_ce_only, linear_ce_reference, grads=2))),
)


def fresh_copies(inputs: Inputs, dtype: torch.dtype | None = None) -> Inputs:
    """New leaves of the floating inputs (in `dtype` if given), with their requires_grad:
    a peer that writes over its inputs leaves the others intact."""
    return tuple(x.detach().to(dtype or x.dtype).clone().requires_grad_(x.requires_grad) if x.is_floating_point()
                 else x for x in inputs)


def value_and_grads(fn: Callable[..., Tensor], inputs: Inputs, count: int) -> tuple[Tensor, list[Tensor]]:
    """fn's value and its gradients to the first `count` inputs that require grad."""
    wrt = [x for x in inputs if x.is_floating_point() and x.requires_grad][:count]
    value = fn(*inputs)
    return value.detach().double(), [g.double() for g in torch.autograd.grad(value, wrt)]


def relative_error(got: Tensor, want: Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-12)).item()


def run_check(problem: Problem, check: Check, device: str, seed: int = 0) -> dict[str, object]:
    """One check on fresh tiny inputs (N = 64, C = 37, float32): worst relative error of the
    value and of each gradient against the float64 reference. On a CPU a GPU-only check
    runs its stand-in, or is skipped with its reason."""
    claim, fn, note = check.claim, check.fn, {}
    if check.gpu_only and device == "cpu":
        note = {"kernel_gpu_only": check.gpu_only}
        if check.cpu_fn is None:
            return {"problem": problem.name, "claim": claim, "status": "skipped: GPU-only", **note}
        claim, fn = check.cpu_claim, check.cpu_fn
    torch.manual_seed(seed)
    inputs, _ = problem.setup(64, 37, "fp32", device)
    got, got_grads = value_and_grads(fn, fresh_copies(inputs), check.grads)
    want, want_grads = value_and_grads(check.reference, fresh_copies(inputs, torch.float64), check.grads)
    errors = [relative_error(got, want)] + [relative_error(g, w) for g, w in zip(got_grads, want_grads, strict=True)]
    # float32 on a CPU; on a GPU the peers' float32 dots are TF32 (10-bit mantissa)
    tolerance = 1e-5 if device == "cpu" else 5e-3
    return {"problem": problem.name, "claim": claim, "status": "ok" if max(errors) <= tolerance else "FAILED",
            "value_error": errors[0], "grad_errors": errors[1:], "tolerance": tolerance, **note}


def run_checks(device: str, problems: tuple[Problem, ...] = PROBLEMS) -> list[dict[str, object]]:
    return [run_check(problem, check, device) for problem in problems for check in problem.checks]
