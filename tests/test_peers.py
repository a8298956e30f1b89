"""The peers of the loss kernels (benchmarks/loss_peers.py) compute what their rows say:
each peer and our public loss function, restricted to the quantity they share, agree with
one float64 reference on fresh tiny inputs, and a check tells the quantities apart when
they differ. Liger's kernels run here under the Triton interpreter; Inf-CL's and CCE's
cannot (the reasons are checked to hold), so their wrapper with a PyTorch log-sum-exp and
their PyTorch implementation stand in until the GPU session runs the kernels themselves."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import loss_peers  # noqa: E402

if loss_peers.missing_peers():
    pytest.skip(f"{', '.join(loss_peers.missing_peers())} not installed: pip install -e '.[peers]'",
                allow_module_level=True)

PROBLEMS = {problem.name: problem for problem in loss_peers.PROBLEMS}
CHECKS = [(problem, check) for problem in loss_peers.PROBLEMS for check in problem.checks]


def test_the_installed_peers_are_the_pinned_ones() -> None:
    """setup.py's [peers] extra, what gpu_session.sh installs from its wheels, and what the
    rows were written against are one list."""
    pins = re.search(r'"peers": \[(.*?)\]', (REPO / "setup.py").read_text()).group(1)
    assert dict(re.findall(r'"([\w-]+)==([\w.]+)"', pins)) == loss_peers.PEER_VERSIONS
    session = re.search(r"install_peers \d+ (.*)", (REPO / "benchmarks" / "gpu_session.sh").read_text()).group(1)
    assert dict(re.findall(r"([\w-]+)==([\w.]+)", session)) == loss_peers.PEER_VERSIONS
    assert loss_peers.installed_versions() == loss_peers.PEER_VERSIONS


@pytest.mark.parametrize("problem,check", CHECKS, ids=[f"{p.name}-{i}" for i, (p, _) in enumerate(CHECKS)])
def test_peer_and_ours_agree_on_the_compared_quantity(problem, check) -> None:
    result = loss_peers.run_check(problem, check, "cpu", seed=int(torch.randint(0, 2**31, ())))
    assert result["status"] == "ok", result
    assert len(result["grad_errors"]) == check.grads


@pytest.mark.parametrize("problem,fn,wrong_reference", [
    # Inf-CL keeps the query's own key in its log-sum-exp; ours masks it
    ("infonce_vs_o2a", loss_peers.infcl_wrapper_on_cpu,
     lambda f, y: loss_peers.info_nce(f, y, self_in_denominator=False)),
    ("infonce_vs_o2a", loss_peers.o2a_one_positive, lambda f, y: loss_peers.info_nce(f, y, self_in_denominator=True)),
    # the training objective is not plain CE: the checks restrict ours to it
    ("ce_vs_ce_bdc", loss_peers.ours_ce_bdc, loss_peers.ce_reference),
    ("linear_ce_vs_classifier_ce_bdc", loss_peers.ours_classifier, loss_peers.linear_ce_reference),
])
def test_a_check_tells_different_quantities_apart(problem, fn, wrong_reference) -> None:
    check = loss_peers.Check("poisoned", fn, wrong_reference)
    assert loss_peers.run_check(PROBLEMS[problem], check, "cpu")["status"] == "FAILED"


def test_infcl_rows_are_gpu_only_and_need_its_head_dimension_set_to_d() -> None:
    """The reasons the Inf-CL row gives: its kernel asserts CUDA tensors, and its default
    head dimension (256) cannot view D = 128 features."""
    (features, labels), _ = loss_peers.pairs_setup(8, 0, "fp32", "cpu")
    assert "asserts CUDA tensors" in loss_peers.INFCL_GPU_ONLY
    with pytest.raises(AssertionError):
        loss_peers.infcl_loss(features, labels)
    cal_flash_loss = loss_peers.peer("inf_cl", "cal_flash_loss")
    with pytest.raises(RuntimeError, match="256.*is invalid"):
        cal_flash_loss(features, features, torch.arange(8) ^ 1, scale=10.0)  # head_dim=256


def test_cce_kernels_do_not_run_under_the_interpreter() -> None:
    """Why CCE's own check runs its TORCH_COMPILE implementation on a CPU."""
    from triton.runtime.errors import InterpreterError

    inputs, _ = loss_peers.classifier_setup(4, 5, "fp32", "cpu")
    with pytest.raises(InterpreterError):
        loss_peers.cce_loss(*inputs)
