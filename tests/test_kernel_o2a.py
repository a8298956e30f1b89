"""Fused O2A kernel against the PyTorch reference and a float64 brute force.

On CPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET),
which is serial and slow: CPU shapes stay at n <= 100. Every run starts from a fresh
random seed (printed, so a failure can be replayed) and with the kernels' output
buffers poisoned with NaN, so matching the reference proves every element was written.
"""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import triton
from conftest import requires_gpu
from kernel_testing import (  # noqa: F401 (autouse fixture)
    BENCHMARKS,
    assert_close_to_largest,
    compile_for_sm90,
    poisoned_random_run,
)
from torch import Tensor

from jrcl_fast.kernels import o2a
from jrcl_fast.kernels.o2a import fused_o2a_per_anchor
from jrcl_fast.kernels.specs import O2AArgs
from jrcl_fast.losses import one_to_all_supcon
from jrcl_fast.losses.reference import o2a_per_anchor_reference

TAU = 0.1


def brute_force(
    anchors: Tensor, keys: Tensor, key_labels: list[int], offset: int, tau: float, class_average: bool
) -> tuple[Tensor, list[int]]:
    """The O2A definition, one anchor and one key at a time, in float64 (differentiable)."""
    count = Counter(key_labels)
    losses, num_pos = [], []
    for i in range(anchors.shape[0]):
        me, y = offset + i, key_labels[offset + i]
        den, pos = 0.0, []
        for j, label in enumerate(key_labels):
            if j == me:
                continue
            s = torch.dot(anchors[i], keys[j]) / tau
            weight = 1.0 / max(count[label] - (label == y), 1) if class_average else 1.0
            den = den + weight * torch.exp(s)
            if label == y:
                pos.append(s)
        num_pos.append(len(pos))
        losses.append(torch.log(den) - sum(pos) / len(pos) if pos else 0.0 * anchors[i].sum())
    return torch.stack(losses), num_pos


def random_problem(
    n: int, m: int, offset: int, dim: int, num_classes: int, device: str, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Unit-norm keys whose labels use about half of the classes (the rest are absent),
    with a few anchors given a label seen nowhere else (no positive)."""
    keys = F.normalize(torch.randn(m, dim, device=device), dim=1).to(dtype)
    present = torch.randperm(num_classes, device=device)[: max(1, num_classes // 2)]
    labels = present[torch.randint(0, len(present), (m,), device=device)]
    absent = [c for c in range(num_classes) if c not in set(present.tolist())]
    lonely = torch.randperm(n, device=device)[: min(3, len(absent), n // 2)] + offset
    labels[lonely] = torch.tensor(absent[: len(lonely)], device=device, dtype=labels.dtype)
    return keys, labels


def run_with_grads(fn, anchors: Tensor, keys: Tensor, labels: Tensor, offset: int, class_average: bool, upstream: Tensor,
                   tau: float = TAU):
    """Loss, positives and the gradients of sum(upstream * loss) w.r.t. independent
    leaf copies of the anchors and the keys."""
    a = anchors.detach().clone().requires_grad_()
    k = keys.detach().clone().requires_grad_()
    n = a.shape[0]
    loss, num_pos = fn(O2AArgs(a, labels[offset : offset + n], k, labels, offset, tau, class_average))
    (loss * upstream.to(loss.dtype)).sum().backward()
    return loss.detach(), num_pos, a.grad, k.grad


# (n, M, anchor offset, D, classes): n = M = 1 is an anchor alone; offset > 0 puts
# keys of "other ranks" on both sides; C = 365 leaves most anchors without positives.
CASES = [(1, 1, 0, 32, 20), (1, 40, 17, 32, 20), (70, 70, 0, 32, 20), (45, 130, 50, 128, 365), (67, 67, 0, 128, 20)]


@pytest.mark.parametrize("class_average", [True, False])
@pytest.mark.parametrize("n,m,offset,dim,num_classes", CASES)
def test_matches_reference_and_brute_force(
    n: int, m: int, offset: int, dim: int, num_classes: int, class_average: bool, device: str
) -> None:
    keys, labels = random_problem(n, m, offset, dim, num_classes, device)
    anchors = keys[offset : offset + n]
    upstream = torch.rand(n, device=device) + 0.5
    loss, num_pos, grad_a, grad_k = run_with_grads(fused_o2a_per_anchor, anchors, keys, labels, offset, class_average, upstream)

    for tensor in (loss, grad_a, grad_k):
        assert torch.isfinite(tensor).all()
    assert loss.dtype == torch.float32 and num_pos.dtype == torch.int64
    assert grad_a.dtype == anchors.dtype and grad_k.dtype == keys.dtype
    if n > 1:  # the problem covers anchors with and without positives
        assert (num_pos == 0).any() and (num_pos > 0).any()

    ref = run_with_grads(o2a_per_anchor_reference, anchors, keys, labels, offset, class_average, upstream)
    torch.testing.assert_close(num_pos, ref[1])
    for got, want in zip((loss, grad_a, grad_k), (ref[0], ref[2], ref[3])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)

    a64 = anchors.detach().double().cpu().requires_grad_()
    k64 = keys.detach().double().cpu().requires_grad_()
    bf_loss, bf_num_pos = brute_force(a64, k64, labels.tolist(), offset, TAU, class_average)
    # materialize: with a lone anchor nothing depends on the keys.
    bf_grads = torch.autograd.grad((bf_loss * upstream.double().cpu()).sum(), (a64, k64), materialize_grads=True)
    assert num_pos.tolist() == bf_num_pos
    for got, want in zip((loss, grad_a, grad_k), (bf_loss.detach(), *bf_grads)):
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=5e-5)


# (n, M, anchor offset): the anchors' own keys start and end inside tiles, with whole
# tiles of other keys before and after them in both passes, and past the last anchor block.
DIAGONAL_CASES = [(70, 200, 61), (33, 150, 100), (64, 192, 64), (5, 131, 126)]


# float16 at D = 32 runs the split loops (o2a.SPLIT_DIAGONAL_MAX_ROW_BYTES; 64 x 64
# tiles) online, float32 one masked loop (forward 32 x 64, keys' backward 32 x 32 tiles)
# against fixed references, and split when told to: the forward of bfloat16 training on a
# GPU, which the interpreter runs in float32.
@pytest.mark.parametrize("dtype,split,tol", [(torch.float16, True, 4e-3), (torch.float32, False, 1e-5),
                                             (torch.float32, True, 1e-5)])
@pytest.mark.parametrize("n,m,offset", DIAGONAL_CASES)
def test_only_the_tiles_on_the_diagonal_mask_self_pairs(
    n: int, m: int, offset: int, dtype: torch.dtype, split: bool, tol: float, device: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Split, each pass masks an anchor's own key only in the one or two tiles that hold
    it: a tile left out of that range would count exp(1/tau) into the denominator
    (checked against the float64 reference)."""
    if split and dtype == torch.float32:
        force_split(monkeypatch, device)
    assert all(t["SPLIT_DIAGONAL"] == split for p in o2a.PASSES for t in o2a.tile_candidates(32, dtype.itemsize, p))
    keys, labels = random_problem(n, m, offset, 32, 20, device, dtype)
    anchors = keys[offset : offset + n]
    upstream = torch.rand(n, device=device) + 0.5
    got = run_with_grads(fused_o2a_per_anchor, anchors, keys, labels, offset, True, upstream)
    want = run_with_grads(o2a_per_anchor_reference, anchors.double(), keys.double(), labels, offset, True,
                          upstream.double())
    torch.testing.assert_close(got[1], want[1])
    assert_close_to_largest((got[0].double(), got[2].double(), got[3].double()), (want[0], want[2], want[3]), tol)


def test_fixed_references_bound_each_anchor_where_its_group_allows(device: str) -> None:
    """r_i = scale |a_i| max_j |k_j|, and +inf for all of a group of
    FIXED_REFERENCE_GROUP anchors with one whose 2 r_i + log2 M exceeds the gap bound or
    whose vectors are not finite (float64 check)."""
    group = o2a.FIXED_REFERENCE_GROUP
    keys = F.normalize(torch.randn(3 * group + 50, 16, device=device), dim=1) * 0.5
    keys[20 + group + 22] *= 4  # length 2 (the longest key): 2 x 14.4 x 4 + log2 M > 100
    anchors = keys[20 : 20 + 2 * group + 44].clone()
    anchors[2 * group + 5, 2] = float("nan")
    scale = 1.4427 / 0.1
    got = o2a.fixed_references(anchors, keys, scale)
    assert torch.isinf(o2a.fixed_references(anchors.half(), keys.half(), scale)).all()  # float16: online
    bound = scale * anchors.double().norm(dim=1) * keys.double().norm(dim=1).max()
    gap = 2 * bound + math.log2(keys.shape[0])
    assert (gap[:group] <= o2a.FIXED_REFERENCE_MAX_GAP).all() and gap[group + 22] > o2a.FIXED_REFERENCE_MAX_GAP
    assert got.dtype == torch.float32 and torch.isinf(got[group:]).all()  # groups 1 (long anchor) and 2 (NaN)
    torch.testing.assert_close(got[:group], bound[:group].float())
    assert all(block in {16, 32, 64, 128} and group % block == 0
               for tiles in o2a.TILES.values() for listed in tiles.values() for block, *_ in listed)


@pytest.mark.parametrize("dtype,launches", [(torch.float16, 1), (torch.float32, 2), (torch.bfloat16, 2)])
def test_forward_launches_fixed_then_online_except_in_float16(
    dtype: torch.dtype, launches: int, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """float16 has no fixed references: its one forward launch is the online one, which
    the GPU autotuner then times on the real work (not on a launch with nothing to do)."""
    seen, launch_tile = [], o2a.launch_tile
    monkeypatch.setattr(o2a, "launch_tile", lambda *args: seen.append(args[2]) or launch_tile(*args))
    keys, labels = random_problem(20, 30, 5, 32, 4, device, dtype)
    fused_o2a_per_anchor(O2AArgs(keys[5:25], labels[5:25], keys, labels, 5, TAU))
    assert seen.count("fwd") == launches


def force_split(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    """Float32 tiles split at the diagonal, as bfloat16 training's on a GPU, which the
    interpreter runs in float32. Interpreter only: the GPU autotuner's configurations are
    built at import and do not follow the patch."""
    if device == "cuda":
        pytest.skip("forces the split through the interpreter's tile choice")
    monkeypatch.setattr(o2a, "SPLIT_DIAGONAL_MAX_ROW_BYTES", 512)


def mixed_problem(n: int, short: slice, device: str) -> tuple[Tensor, Tensor, Tensor, int, float]:
    """At tau = 0.02 unit-length anchors are too far from their bound for a fixed
    reference (2 x 72 + log2 M > 100); short ones (length 0.3) are not."""
    offset, tau = 10, 0.02
    keys, labels = random_problem(n, n + 30, offset, 32, 8, device)
    keys[offset : offset + n][short] *= 0.3
    return keys[offset : offset + n], keys, labels, offset, tau


# Float32 forward tiles of 32 anchors; in one loop or split at the diagonal (force_split).
@pytest.mark.parametrize("split", [False, True])
def test_groups_whose_bound_is_too_loose_run_online(split: bool, device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Group 0 (anchors 0..127) short: fixed references; group 1 with long anchors:
    online. A fixed reference 300 below the bound overflows exactly group 0 and leaves
    group 1 exact, which shows each launch takes its own blocks (the other tests run the
    fixed path alone); with the true references loss and gradients match float64."""
    if split:
        force_split(monkeypatch, device)
    assert o2a.tile_candidates(32, 4, "fwd")[0]["SPLIT_DIAGONAL"] == split
    group = o2a.FIXED_REFERENCE_GROUP
    anchors, keys, labels, offset, tau = mixed_problem(group + 72, slice(0, group + 40), device)
    fixed = torch.isfinite(o2a.fixed_references(anchors, keys, 1.4427 / tau))
    assert fixed[:group].all() and not fixed[group:].any()

    ones = torch.ones(anchors.shape[0], device=device)
    want = run_with_grads(o2a_per_anchor_reference, anchors.double(), keys.double(), labels, offset, True, ones, tau)
    got = run_with_grads(fused_o2a_per_anchor, anchors, keys, labels, offset, True, ones, tau)
    torch.testing.assert_close(got[1], want[1])
    assert_close_to_largest((got[0].double(), got[2].double(), got[3].double()), (want[0], want[2], want[3]), 1e-5)

    true_references = o2a.fixed_references
    monkeypatch.setattr(o2a, "fixed_references", lambda *args: true_references(*args) - 300.0)
    loss = run_with_grads(fused_o2a_per_anchor, anchors, keys, labels, offset, True, ones, tau)[0]
    assert not torch.isfinite(loss[:group][want[1][:group] > 0]).any()
    torch.testing.assert_close(loss[group:].double(), want[0][group:], rtol=1e-5,
                               atol=1e-5 * want[0].abs().max().item())


def test_the_two_forward_launches_agree_whatever_tiles_they_run(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU each launch's tile is the autotuner's: the fixed-reference launch with 32
    anchors a block and the online one with 16 must still cover every anchor once. One
    long anchor (row 40) puts its whole group online, not only its block."""
    if device == "cuda":
        pytest.skip("the interpreter's check: on a GPU both launches share the autotuner's tile")
    tiles = {t["BLOCK_N"]: t for t in o2a.tile_candidates(32, 4, "fwd")}
    launches = iter([tiles[32], tiles[16], None])
    monkeypatch.setattr(o2a, "launch_tile", lambda dim, size, pass_name: next(launches) if pass_name == "fwd"
                        else o2a.tile_candidates(dim, size, pass_name)[0])
    group = o2a.FIXED_REFERENCE_GROUP
    short = torch.ones(group + 72, dtype=torch.bool)
    short[40] = False
    anchors, keys, labels, offset, tau = mixed_problem(group + 72, short, device)
    ones = torch.ones(anchors.shape[0], device=device)
    want = run_with_grads(o2a_per_anchor_reference, anchors.double(), keys.double(), labels, offset, True, ones, tau)
    got = run_with_grads(fused_o2a_per_anchor, anchors, keys, labels, offset, True, ones, tau)
    assert next(launches) is None  # both forward launches ran with the tiles given
    assert_close_to_largest((got[0].double(), got[2].double(), got[3].double()), (want[0], want[2], want[3]), 1e-5)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the interpreter's numpy warns on a log(0)
def test_anchor_without_any_other_key_is_zero(device: str) -> None:
    a = torch.randn(1, 32, device=device, requires_grad=True)
    label = torch.zeros(1, dtype=torch.long, device=device)
    loss, num_pos = fused_o2a_per_anchor(O2AArgs(a, label, a, label, 0, TAU))
    loss.sum().backward()
    assert loss.item() == 0.0 and num_pos.item() == 0
    assert torch.equal(a.grad, torch.zeros_like(a))


@pytest.mark.parametrize("needs", ["anchors", "keys"])
def test_gradient_to_one_input_only(needs: str, device: str) -> None:
    keys, labels = random_problem(40, 90, 25, 32, 20, device)
    a = keys[25:65].clone().requires_grad_(needs == "anchors")
    k = keys.clone().requires_grad_(needs == "keys")
    loss, _ = fused_o2a_per_anchor(O2AArgs(a, labels[25:65], k, labels, 25, TAU))
    loss.sum().backward()
    ref_a = keys[25:65].clone().requires_grad_(needs == "anchors")
    ref_k = keys.clone().requires_grad_(needs == "keys")
    o2a_per_anchor_reference(O2AArgs(ref_a, labels[25:65], ref_k, labels, 25, TAU))[0].sum().backward()
    got, want = (a.grad, ref_a.grad) if needs == "anchors" else (k.grad, ref_k.grad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    assert (k.grad if needs == "anchors" else a.grad) is None


@pytest.mark.parametrize("num_classes,class_average", [(1, True), (20, True), (20, False)])
def test_public_dispatch_matches_torch(num_classes: int, class_average: bool, device: str) -> None:
    """one_to_all_supcon(backend="triton") through torch.cat of features and prototypes:
    the features receive both the anchor and the key gradient."""
    features = F.normalize(torch.randn(53, 64, device=device), dim=1)
    prototypes = F.normalize(torch.randn(num_classes, 64, device=device), dim=1)
    labels = torch.randint(0, num_classes, (53,), device=device)
    results = {}
    for backend in ("triton", "torch"):
        f = features.clone().requires_grad_()
        p = prototypes.clone().requires_grad_()
        loss = one_to_all_supcon(f, labels, p, temperature=TAU, class_average=class_average, backend=backend)
        loss.backward()
        results[backend] = (loss.detach(), f.grad, p.grad)
    for got, want in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_rejects_float64_and_mixed_dtypes(device: str) -> None:
    x = torch.randn(4, 32, device=device, dtype=torch.float64)
    labels = torch.zeros(4, dtype=torch.long, device=device)
    with pytest.raises(TypeError, match="float64"):
        fused_o2a_per_anchor(O2AArgs(x, labels, x, labels, 0, TAU))
    with pytest.raises(TypeError, match="share a dtype"):
        fused_o2a_per_anchor(O2AArgs(x.half(), labels, x.float(), labels, 0, TAU))


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
def test_half_precision_inputs(dtype: torch.dtype, tol: float, device: str) -> None:
    """Float32 loss, gradients in the input dtype. (Under the interpreter bfloat16 runs
    in float32, see fused_o2a_per_anchor; the compiled bfloat16 path is the GPU test's.)"""
    keys, labels = random_problem(60, 100, 20, 64, 20, device, dtype)
    upstream = torch.rand(60, device=device) + 0.5
    got = run_with_grads(fused_o2a_per_anchor, keys[20:80], keys, labels, 20, True, upstream)
    want = run_with_grads(o2a_per_anchor_reference, keys[20:80], keys, labels, 20, True, upstream)
    torch.testing.assert_close(got[1], want[1])
    assert got[0].dtype == torch.float32
    assert_close_to_largest((got[0], got[2], got[3]), (want[0], want[2], want[3]), tol)


# (dtype, D): the row widths of o2a.TILES' three lists (half precision 256 bytes, float32
# up to 512 bytes, wider); the interpreter runs float16 as float16.
@pytest.mark.parametrize("dtype,dim,tol", [(torch.float16, 24, 4e-3), (torch.float32, 24, 1e-4),
                                           (torch.float32, 150, 1e-4)])
def test_every_tile_the_gpu_autotuner_may_pick_matches_the_reference(
    dtype: torch.dtype, dim: int, tol: float, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU Triton picks the fastest of each pass's tiles; every one of them must
    compute the same loss and gradients (n, M not multiples of any tile)."""
    if device == "cuda":
        pytest.skip("the interpreter's check: on a GPU the autotuner's own choice runs in the other tests")
    listed, launched = o2a.tile_candidates, []
    widest = max(len(listed(dim, dtype.itemsize, p)) for p in o2a.PASSES)
    keys, labels = random_problem(37, 83, 19, dim, 20, device, dtype)
    upstream = torch.rand(37, device=device) + 0.5
    want = run_with_grads(o2a_per_anchor_reference, keys[19:56], keys, labels, 19, True, upstream)
    for index in range(widest):
        def only_tile(d: int, size: int, pass_name: str, i: int = index) -> list[dict[str, int]]:
            tiles = listed(d, size, pass_name)
            return [tiles[i % len(tiles)]]

        def recorded(d: int, size: int, pass_name: str) -> dict[str, int]:
            launched.append((pass_name, o2a.tile_candidates(d, size, pass_name)[0]))
            return launched[-1][1]

        monkeypatch.setattr(o2a, "tile_candidates", only_tile)
        monkeypatch.setattr(o2a, "launch_tile", recorded)
        got = run_with_grads(fused_o2a_per_anchor, keys[19:56], keys, labels, 19, True, upstream)
        torch.testing.assert_close(got[1], want[1])
        assert_close_to_largest((got[0], got[2], got[3]), (want[0], want[2], want[3]), tol)
        assert launched[-2:] == [(p, only_tile(dim, dtype.itemsize, p)[0]) for p in o2a.PASSES]


@pytest.mark.parametrize("dim,elem_size", [(24, 2), (128, 2), (256, 2), (64, 4), (128, 4), (256, 4)])
def test_the_gpu_autotuner_times_the_listed_tiles_in_order(dim: int, elem_size: int) -> None:
    """What each launch's prune hands the autotuner: tile_candidates' tiles, first the
    one the interpreter runs, each a distinct configuration of the autotuner's list."""
    for pass_name in o2a.PASSES:
        configs = o2a.gpu_configs(pass_name, dim, elem_size)
        tiles = [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in configs]
        assert tiles == o2a.tile_candidates(dim, elem_size, pass_name)
        assert len(set(map(id, configs))) == len(configs)
        assert all(c in o2a.GPU_CONFIGS[pass_name].values() for c in configs)


def test_on_a_gpu_each_pass_is_autotuned_over_its_listed_tiles() -> None:
    """Imported without the interpreter, as on a GPU, each kernel is a Triton autotuner
    keyed per shape and variant, whose prune hands it gpu_configs' list for the launch:
    through Triton's own prune_configs too, as a launch whose arguments are all keywords
    (as o2a's are) reaches it, with nothing passed by position."""
    script = """
import json, torch
from triton.runtime.autotuner import Autotuner
from jrcl_fast.kernels import o2a
found = {}
for name, kernel in (("fwd", o2a._o2a_fwd_kernel), ("bwd_keys", o2a._o2a_bwd_keys_kernel)):
    for dtype, dim in ((torch.bfloat16, 128), (torch.float32, 128), (torch.float32, 256)):
        nargs = {"D": dim, "a_ptr": torch.empty(0, dtype=dtype)}
        same = kernel.early_config_prune(kernel.configs, nargs) == o2a.gpu_configs(name, dim, dtype.itemsize)
        kernel.nargs = {}  # Autotuner.run's dict of the positional arguments
        same_by_keyword = kernel.prune_configs(nargs) == o2a.gpu_configs(name, dim, dtype.itemsize)
        found[f"{name} {dtype} {dim}"] = [isinstance(kernel, Autotuner), kernel.keys, same and same_by_keyword]
print(json.dumps(found))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    found = json.loads(done.stdout.splitlines()[-1])
    assert len(found) == 6
    assert all(v == [True, ["n", "M", "D", "DOT_PRECISION", "STORE_O"], True] for v in found.values()), found


def test_every_tile_compiles_for_sm90_without_spills() -> None:
    """The GPU autotuner's candidates through the real compiler and ptxas (registers
    and spill bytes read from its report), with the Triton they were chosen with: the
    first tile of each list (the interpreter's, and kernel_sass's figures) spills
    nothing, the others at most 64 bytes (float32 forwards sit at the 255-register
    limit, where a few bytes come and go with the shape). Triton 3.6 allocates registers
    differently and spills more (docs/BENCHMARKS.md); a spilling tile only loses the
    autotuner's timing."""
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 8):
        pytest.skip(f"the tiles were chosen with Triton 3.8's compiler; this is {triton.__version__}")
    script = """
import dataclasses, json, sys
sys.path.insert(0, sys.argv[1])
import kernel_sass
rows = []
for dtype, dim, precision in json.load(sys.stdin):
    passes_seen = set()
    for spec in kernel_sass.o2a_specs(1000, 365, dim, dtype, precision, all_tiles=True):
        first = spec.name.split()[0] not in passes_seen  # the first tile of its pass's list
        passes_seen.add(spec.name.split()[0])
        # The forward against fixed references (as specified), and online (its fallback).
        for fixed in (True, False) if "FIXED_REF" in spec.constexprs else (None,):
            if fixed is False:
                spec = dataclasses.replace(spec, constexprs={**spec.constexprs, "FIXED_REF": False})
            _registers, spills = kernel_sass.ptxas_usage(kernel_sass.compile_sm90(spec).asm["ptx"])
            rows.append([f"{dtype} D={dim} {precision} {spec.name} fixed={fixed}", spills, first])
print(json.dumps(rows))
"""
    cases = [("bf16", 128, "tf32x3"), ("fp16", 256, "tf32x3"), ("fp32", 128, "tf32x3"), ("fp32", 128, "ieee"),
             ("fp32", 64, "ieee")]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script, str(BENCHMARKS)], input=json.dumps(cases), env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads(done.stdout.splitlines()[-1])
    size = {"bf16": 2, "fp16": 2, "fp32": 4}
    # Two forward variants per tile.
    assert len(rows) == sum(len(o2a.tile_candidates(dim, size[dtype], p)) * (2 if p == "fwd" else 1)
                            for dtype, dim, _ in cases for p in o2a.PASSES)
    assert [name for name, spills, first in rows if spills and first] == []
    assert [name for name, spills, _ in rows if spills > 64] == []
    assert sum(first for *_, first in rows) == 2 * len(cases) + len(cases)  # both forward variants, the backward


def test_kernels_compile_for_sm90() -> None:
    """The kernels through the real compiler at their launch configurations, both dot
    precisions in float32, without class averaging, without the anchors' O, and the
    forward online as well as against fixed references."""
    requests = []
    for dtype, dim in (("fp32", 128), ("bf16", 128), ("fp16", 256)):
        for precision in o2a.DOT_PRECISIONS if dtype == "fp32" else ("tf32x3",):
            shape = {"n": 1000, "classes": 365, "dim": dim, "dtype": dtype, "dot_precision": precision}
            requests.append(("o2a", shape, {"CLASS_AVERAGE": dtype != "fp16", "STORE_O": dtype != "bf16",
                                            "FIXED_REF": dtype == "fp16"}))
    compile_for_sm90(requests)


@requires_gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("num_classes", [365, 8142])
@pytest.mark.parametrize("dim", [128, 256])
def test_compiled_gpu(dtype: torch.dtype, tol: float, num_classes: int, dim: int) -> None:
    """Compiled kernels at training-like sizes, half precision included: keys are the
    gathered features of four "ranks" plus prototypes, the anchors one rank's rows."""
    n, ranks = 1000, 4
    keys, labels = random_problem(n, n * ranks, n, dim, num_classes, "cuda", dtype)
    prototypes = F.normalize(torch.randn(num_classes, dim, device="cuda"), dim=1).to(dtype)
    keys = torch.cat([keys, prototypes])
    labels = torch.cat([labels, torch.arange(num_classes, device="cuda")])
    upstream = torch.rand(n, device="cuda")
    got = run_with_grads(fused_o2a_per_anchor, keys[n : 2 * n], keys, labels, n, True, upstream)
    want = run_with_grads(o2a_per_anchor_reference, keys[n : 2 * n], keys, labels, n, True, upstream)
    torch.testing.assert_close(got[1], want[1])
    assert_close_to_largest((got[0], got[2], got[3]), (want[0], want[2], want[3]), tol)


def test_kernels_import_nothing_from_jrcl_fast() -> None:
    """kernels/ is the leaf of the package: importing a kernel must not load the losses
    or the config (their own modules are imported relatively)."""
    kernel_dir = Path(o2a.__file__).parent
    offenders = []
    for path in sorted(kernel_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            offenders += [f"{path.name}: {name}" for name in names if name.split(".")[0] == "jrcl_fast"]
    assert len(list(kernel_dir.glob("*.py"))) >= 3 and not offenders, offenders


@requires_gpu
def test_training_losses_never_wait_for_the_gpu() -> None:
    """Forward and backward of both fused losses through their public functions with
    CUDA's sync debug mode set to error: any device-to-host read (a bincount sized
    from the data, a value check) raises."""
    from jrcl_fast.losses import ce_bdc_loss

    features = F.normalize(torch.randn(256, 64, device="cuda"), dim=1).requires_grad_()
    prototypes = F.normalize(torch.randn(30, 64, device="cuda"), dim=1).requires_grad_()
    labels = torch.randint(0, 30, (256,), device="cuda")
    logits = torch.randn(256, 30, device="cuda", requires_grad=True)
    binary_logits = torch.randn(256, 2, device="cuda", requires_grad=True)
    normal_mask = torch.arange(30, device="cuda") < 10
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total = one_to_all_supcon(features, labels, prototypes, temperature=TAU)
        total = total + ce_bdc_loss(logits, binary_logits, labels, normal_mask, torch.zeros(30, device="cuda")).total
        total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(total) and features.grad is not None and logits.grad is not None


def test_key_classes_match_bincount(device: str) -> None:
    """Sparse labels up to 10^6 (most classes absent): each key's class size, as
    bincount over the labels would give it."""
    labels = torch.randint(0, 10**6, (50,), device=device)
    labels[torch.randperm(50, device=device)[:20]] = labels[0].item()  # one class with many keys
    want = torch.bincount(labels)[labels].to(torch.int32)
    slots, sizes = o2a.key_classes(labels)
    assert slots.min() >= 0 and slots.max() < 50
    torch.testing.assert_close(sizes[slots].to(torch.int32), want)


def labels_for(pattern: str, m: int, device: str) -> Tensor:
    """Key labels of the edge cases of the class weights and positives."""
    if pattern == "one_class":  # every key a positive of every anchor
        return torch.zeros(m, dtype=torch.long, device=device)
    if pattern == "singletons":  # every class has one key: no positives, weights 1
        return torch.randperm(m, device=device) * 7
    # "pairs": each class has two keys, as features with only their prototype
    return torch.arange(m, device=device) % (m // 2)


@pytest.mark.parametrize("class_average", [True, False])
@pytest.mark.parametrize("pattern", ["one_class", "singletons", "pairs"])
def test_label_patterns_match_brute_force(pattern: str, class_average: bool, device: str) -> None:
    """n = 65 and M = 130 are multiples of no block size, and the offset puts the
    anchors' diagonal across tile boundaries."""
    n, m, offset = 65, 130, 33
    keys = F.normalize(torch.randn(m, 32, device=device), dim=1)
    labels = labels_for(pattern, m, device)
    upstream = torch.rand(n, device=device) + 0.5
    loss, num_pos, grad_a, grad_k = run_with_grads(
        fused_o2a_per_anchor, keys[offset : offset + n], keys, labels, offset, class_average, upstream
    )
    a64 = keys[offset : offset + n].double().cpu().requires_grad_()
    k64 = keys.double().cpu().requires_grad_()
    bf_loss, bf_num_pos = brute_force(a64, k64, labels.tolist(), offset, TAU, class_average)
    bf_grads = torch.autograd.grad((bf_loss * upstream.double().cpu()).sum(), (a64, k64), materialize_grads=True)
    assert num_pos.tolist() == bf_num_pos
    for got, want in zip((loss, grad_a, grad_k), (bf_loss.detach(), *bf_grads)):
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=5e-5)


def test_rejects_unknown_dot_precision(device: str) -> None:
    x = torch.randn(4, 32, device=device)
    labels = torch.zeros(4, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="^dot_precision must be one of 'tf32x3', 'ieee', got 'tf32'$"):
        fused_o2a_per_anchor(O2AArgs(x, labels, x, labels, 0, TAU), dot_precision="tf32")


@requires_gpu
@pytest.mark.parametrize("dot_precision,tol", [("tf32x3", 2e-5), ("ieee", 2e-5)])
def test_float32_dot_precision_against_float64(dot_precision: str, tol: float) -> None:
    """Float32 inputs at a training-like size: the loss and gradients of each dot
    precision against float64, relative to the largest entry (printed: the measured
    error is what docs/BENCHMARKS.md quotes)."""
    n, num_classes = 2048, 365
    keys, labels = random_problem(n, n + num_classes, 0, 128, num_classes, "cuda")
    labels[n:] = torch.arange(num_classes, device="cuda")
    upstream = torch.rand(n, device="cuda")
    got = run_with_grads(lambda args: fused_o2a_per_anchor(args, dot_precision=dot_precision),
                         keys[:n], keys, labels, 0, True, upstream)
    want = run_with_grads(o2a_per_anchor_reference, keys[:n].double(), keys.double(), labels, 0, True, upstream.double())
    errors = [((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip((got[0], got[2], got[3]), (want[0], want[2], want[3]))]
    print(f"{dot_precision}: max error / max |value| (loss, grad anchors, grad keys) = {errors}")
    assert max(errors) < tol
