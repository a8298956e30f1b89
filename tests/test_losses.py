"""The PyTorch losses against brute-force float64 loops written from the spec
(docs/METHOD.md), independently of the package: no shared helpers."""

import math

import pytest
import torch
import torch.distributed as dist

from jrcl_fast.kernels.specs import O2AArgs
from jrcl_fast.losses import bdc_loss, ce_bdc_loss, checks, o2a_per_anchor, one_to_all_supcon
from jrcl_fast.losses.checks import check_labels, check_normal_mask, check_o2a_args
from jrcl_fast.losses.contrastive import global_one_to_all_supcon


def brute_o2a(z, y, protos, tau, class_average=True):
    """Plain loops over anchors and keys, float64, autograd-able."""
    keys = list(z) + ([] if protos is None else list(protos))
    key_labels = [int(v) for v in y] + ([] if protos is None else list(range(len(protos))))
    losses = []
    for i in range(len(z)):
        others = [j for j in range(len(keys)) if j != i]
        pos = [j for j in others if key_labels[j] == int(y[i])]
        if not pos:
            continue
        den = 0.0
        for c in set(key_labels[j] for j in others):
            members = [j for j in others if key_labels[j] == c]
            weight = 1.0 / len(members) if class_average else 1.0
            den = den + weight * sum(torch.exp(torch.dot(z[i], keys[j]) / tau) for j in members)
        pos_mean = sum(torch.dot(z[i], keys[j]) / tau for j in pos) / len(pos)
        losses.append(torch.log(den) - pos_mean)
    if not losses:
        return (z * 0).sum() + (0 if protos is None else (protos * 0).sum())
    return sum(losses) / len(losses)


def brute_bdc(logits, binary_logits, normal, divergence):
    total = 0.0
    for row, brow in zip(logits, binary_logits):
        p = torch.softmax(row, 0)
        p_normal = sum(p[c] for c in range(len(row)) if normal[c])
        p_abnormal = sum(p[c] for c in range(len(row)) if not normal[c])
        q = torch.softmax(brow, 0)
        pi = [p_normal, p_abnormal]
        if divergence == "js":
            m = [(pi[k] + q[k]) / 2 for k in range(2)]
            total = total + sum(0.5 * pi[k] * torch.log(pi[k] / m[k]) + 0.5 * q[k] * torch.log(q[k] / m[k]) for k in range(2))
        else:
            total = total + sum(pi[k] * torch.log(pi[k] / q[k]) + q[k] * torch.log(q[k] / pi[k]) for k in range(2))
    return total / len(logits)


def unit_rows(n, d):
    return torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).requires_grad_()


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


O2A_CASES = [
    # (N, C, D, label draw)
    (1, 3, 4, "random"),
    (7, 5, 8, "random"),
    (13, 10, 6, "absent"),  # labels only from the first 3 of 10 classes
    (9, 4, 5, "one_class"),
    (16, 1, 3, "random"),  # a single class
    (11, 20, 7, "distinct"),  # every label different: no batch positives
]


def draw_labels(n, c, how):
    if how == "absent":
        return torch.randint(0, min(3, c), (n,))
    if how == "one_class":
        return torch.full((n,), c - 1)
    if how == "distinct":
        return torch.randperm(c)[:n]
    return torch.randint(0, c, (n,))


@pytest.mark.parametrize("n,c,d,how", O2A_CASES)
@pytest.mark.parametrize("with_prototypes", [True, False])
@pytest.mark.parametrize("class_average", [True, False])
def test_o2a_matches_brute_force(n, c, d, how, with_prototypes, class_average):
    z = unit_rows(n, d)
    y = draw_labels(n, c, how)
    protos = unit_rows(c, d) if with_prototypes else None
    tau = float(torch.empty(1).uniform_(0.05, 1.0))
    got = one_to_all_supcon(z, y, protos, tau, class_average=class_average, backend="torch")
    want = brute_o2a(z, y, protos, tau, class_average)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-9, atol=1e-9)
    tensors = (z,) if protos is None else (z, protos)
    for g, w in zip(grads(got, *tensors), grads(want, *tensors)):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-9)


def test_o2a_without_positives_is_zero_with_zero_gradients():
    z = unit_rows(5, 4)
    loss = one_to_all_supcon(z, torch.arange(5), None, 0.1, backend="torch")
    (g,) = grads(loss, z)
    assert loss.item() == 0.0 and torch.equal(g, torch.zeros_like(z))


def test_o2a_with_prototypes_counts_every_anchor():
    # The anchor's own prototype is always a positive, so every anchor counts.
    z, protos = unit_rows(6, 4), unit_rows(6, 4)
    y = torch.arange(6)
    keys, key_labels = torch.cat([z, protos]), torch.cat([y, torch.arange(6)])
    loss, num_pos = o2a_per_anchor(O2AArgs(z, y, keys, key_labels, 0, 0.2, True), "torch")
    assert num_pos.tolist() == [1] * 6  # each anchor's only positive is its prototype
    torch.testing.assert_close(one_to_all_supcon(z, y, protos, 0.2, backend="torch"), loss.mean())


def test_o2a_invariant_to_row_permutation():
    z, protos = unit_rows(24, 8), unit_rows(5, 8)
    y = torch.randint(0, 5, (24,))
    perm = torch.randperm(24)
    a = one_to_all_supcon(z, y, protos, 0.1, backend="torch")
    b = one_to_all_supcon(z[perm], y[perm], protos, 0.1, backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_class_averaging_removes_head_dominance():
    """Duplicating a head class's rows leaves a tail anchor's class-averaged
    denominator unchanged; plain SupCon's grows."""
    d = 6
    head = unit_rows(1, d).detach().repeat(2, 1)
    tail = unit_rows(2, d).detach()
    for class_average, should_change in ((True, False), (False, True)):
        small = torch.cat([tail, head])
        big = torch.cat([tail, head.repeat(5, 1)])
        ys, yb = torch.tensor([1, 1, 0, 0]), torch.tensor([1, 1] + [0] * 10)
        # Compare the tail anchors only: both batches give them the same positives.
        la, _ = o2a_per_anchor(O2AArgs(small, ys, small, ys, 0, 0.5, class_average), "torch")
        lb, _ = o2a_per_anchor(O2AArgs(big, yb, big, yb, 0, 0.5, class_average), "torch")
        assert torch.allclose(la[:2], lb[:2]) != should_change


BDC_CASES = [(1, 2), (5, 3), (17, 10), (8, 20)]


@pytest.mark.parametrize("b,c", BDC_CASES)
@pytest.mark.parametrize("divergence", ["js", "sym_kl"])
def test_bdc_matches_brute_force(b, c, divergence):
    logits = (3 * torch.randn(b, c, dtype=torch.float64)).requires_grad_()
    binary = (3 * torch.randn(b, 2, dtype=torch.float64)).requires_grad_()
    normal = torch.zeros(c, dtype=torch.bool)
    normal[torch.randperm(c)[: int(torch.randint(1, c, ()))]] = True
    got = bdc_loss(logits, binary, normal, divergence)
    want = brute_bdc(logits, binary, normal, divergence)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    for g, w in zip(grads(got, logits, binary), grads(want, logits, binary)):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-10)


def test_bdc_one_normal_class_of_many():
    c = 30
    logits = torch.randn(6, c, dtype=torch.float64, requires_grad=True)
    binary = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    normal = torch.zeros(c, dtype=torch.bool)
    normal[0] = True
    torch.testing.assert_close(bdc_loss(logits, binary, normal), brute_bdc(logits, binary, normal, "js"))


@pytest.mark.parametrize("divergence", ["js", "sym_kl"])
def test_bdc_finite_when_normal_mass_saturates(divergence):
    normal = torch.tensor([True, False, False, False, False])
    logits = torch.tensor([[200.0, -200.0, -200.0, -200.0, -200.0], [-300.0, 300.0, 0.0, 0.0, 0.0]],
                          requires_grad=True)
    binary = torch.tensor([[-50.0, 50.0], [50.0, -50.0]], requires_grad=True)  # maximally inconsistent
    loss = bdc_loss(logits, binary, normal, divergence)
    g_logits, g_binary = grads(loss, logits, binary)
    assert torch.isfinite(loss) and torch.isfinite(g_logits).all() and torch.isfinite(g_binary).all()
    bound = math.log(2) if divergence == "js" else float("inf")
    assert 0 < loss.item() <= bound + 1e-6


def test_bdc_zero_when_heads_agree():
    logits = torch.randn(4, 6, dtype=torch.float64)
    normal = torch.tensor([True, True, False, False, False, False])
    p = torch.softmax(logits, 1)
    p_normal = p[:, normal].sum(1)
    binary = torch.stack([torch.log(p_normal), torch.log1p(-p_normal)], 1)
    assert bdc_loss(logits, binary, normal).abs().item() < 1e-12


def test_ce_bdc_total_is_weighted_sum():
    b, c = 9, 7
    logits, binary = torch.randn(b, c, dtype=torch.float64), torch.randn(b, 2, dtype=torch.float64)
    labels = torch.randint(0, c, (b,))
    normal = torch.zeros(c, dtype=torch.bool)
    normal[:2] = True
    adjustment = torch.randn(c, dtype=torch.float64)
    out = ce_bdc_loss(logits, binary, labels, normal, adjustment, 0.3, 2.5, "js", backend="torch")
    ce = sum(-torch.log_softmax(logits[i] + adjustment, 0)[labels[i]] for i in range(b)) / b
    y_bin = [0 if normal[labels[i]] else 1 for i in range(b)]
    bce = sum(-torch.log_softmax(binary[i], 0)[y_bin[i]] for i in range(b)) / b
    torch.testing.assert_close(out.ce, ce)
    torch.testing.assert_close(out.binary_ce, bce)
    torch.testing.assert_close(out.bdc, brute_bdc(logits, binary, normal, "js"))
    torch.testing.assert_close(out.total, ce + 0.3 * bce + 2.5 * out.bdc)


@pytest.fixture
def value_checks(monkeypatch):
    """JRCL_CHECK_VALUES=1, the debug switch that turns on the checks that read values
    (finite, label range, normal mask, anchors among the keys)."""
    monkeypatch.setattr(checks, "CHECK_VALUES", True)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: bdc_loss(torch.randn(4, 3), torch.randn(4, 3), torch.tensor([True, False, False])), "binary_logits must be a 4 x 2 matrix"),
        (lambda: bdc_loss(torch.randn(4, 3), torch.randn(4, 2), torch.tensor([True, False])), "normal_mask must be a boolean vector of length C = 3"),
        (lambda: bdc_loss(torch.randn(4, 3), torch.randn(4, 2), torch.ones(3, dtype=torch.bool)), "got all True"),
        (lambda: bdc_loss(torch.randn(4, 3), torch.randn(4, 2), torch.zeros(3, dtype=torch.bool)), "got all False"),
        (lambda: bdc_loss(torch.randn(4, 3), torch.full((4, 2), float("inf")), torch.tensor([True, False, False])), "binary_logits contains NaN"),
        (lambda: bdc_loss(torch.randn(4, 3), torch.randn(4, 2), torch.tensor([True, False, False]), "kl"), "divergence must be one of"),
        (lambda: ce_bdc_loss(torch.randn(4, 3), torch.randn(4, 2), torch.tensor([0, 1, 2, 3]), torch.tensor([True, False, False])), r"labels must lie in \[0, 3\)"),
    ],
)
def test_bad_input_names_the_argument(call, message, value_checks):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.fixture(scope="module")
def one_rank_group():
    """global_one_to_all_supcon needs a process group: one rank, in this process."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def long(*values):
    return torch.tensor(values, dtype=torch.long)


NAN = float("nan")
# (features, labels, prototypes, temperature), and the start of the message. Anchored
# with ^: the split-form check inside would otherwise match as "anchor_labels must ...".
BATCH_BAD_INPUTS = [
    ((torch.randn(4), long(0, 0, 0, 0), None, 0.1), "^features must be a N x D matrix"),
    ((torch.arange(8).view(4, 2), long(0, 0, 0, 0), None, 0.1), "^features must be a floating-point tensor"),
    ((torch.tensor([[NAN, 0.0]]), long(0), None, 0.1), "^features contains NaN"),
    ((torch.randn(4, 3), long(0, 0, 0, 0, 0), None, 0.1), "^labels must be a vector of length 4"),
    ((torch.randn(2, 3), torch.zeros(2), None, 0.1), "^labels must be an integer tensor"),
    ((torch.randn(4, 3), long(0, -1, 0, 0), None, 0.1), r"^labels must lie in \[0, inf\)"),
    ((torch.randn(4, 3), long(0, 1, 2, 3), torch.randn(3, 3), 0.1), r"^labels must lie in \[0, 3\)"),
    ((torch.randn(4, 3), long(0, 0, 0, 0), torch.randn(2, 5), 0.1), "^prototypes must be a N x 3 matrix"),
    ((torch.randn(4, 3), long(0, 0, 0, 0), torch.full((2, 3), NAN), 0.1), "^prototypes contains NaN"),
    ((torch.randn(2, 3), long(0, 0), None, 0.0), "^temperature must be positive"),
]


@pytest.mark.parametrize("args,message", BATCH_BAD_INPUTS)
@pytest.mark.parametrize("local", [True, False])
def test_o2a_bad_input_names_the_argument(local, args, message, one_rank_group, value_checks):
    loss = one_to_all_supcon if local else global_one_to_all_supcon
    with pytest.raises(ValueError, match=message):
        loss(*args)


def split_good_input():
    """o2a_per_anchor's (anchors, anchor_labels, keys, key_labels, offset, temperature)
    with the anchors rows 2..4 of 6 keys."""
    keys, key_labels = torch.randn(6, 3), long(0, 1, 2, 0, 1, 2)
    return keys[2:5], key_labels[2:5], keys, key_labels, 2, 0.1


def split_bad_inputs():
    """The good input with one thing wrong."""
    good = split_good_input()
    _, _, keys, key_labels, _, _ = good

    def bad(**change):
        names = ("anchors", "anchor_labels", "keys", "key_labels", "offset", "temperature")
        return tuple(change.get(name, value) for name, value in zip(names, good))

    nan_keys = keys.clone()
    nan_keys[0, 0] = NAN
    rows = "^anchors must be rows 2..4 of keys"
    return [
        (bad(anchors=keys[2]), "^anchors must be a N x D matrix"),
        (bad(anchor_labels=key_labels[2:4]), "^anchor_labels must be a vector of length 3"),
        (bad(anchor_labels=torch.zeros(3)), "^anchor_labels must be an integer tensor"),
        (bad(keys=keys[:, :2]), "^keys must be a N x 3 matrix"),
        (bad(keys=nan_keys), "^keys contains NaN"),
        (bad(keys=keys.double()), "^keys must have the dtype of anchors"),
        (bad(key_labels=key_labels[:5]), "^key_labels must be a vector of length 6"),
        (bad(key_labels=long(-1, 1, 2, 0, 1, 2)), r"^key_labels must lie in \[0, inf\)"),
        (bad(offset=4), rows.replace("2..4", "4..6")),
        (bad(offset=1), rows.replace("2..4", "1..3")),  # in range, but other rows
        (bad(anchor_labels=long(2, 0, 0)), rows),
        (bad(temperature=-1.0), "^temperature must be positive"),
    ]


@pytest.mark.parametrize("args,message", split_bad_inputs())
def test_o2a_split_form_bad_input_names_the_argument(args, message, value_checks):
    with pytest.raises(ValueError, match=message):
        o2a_per_anchor(O2AArgs(*args))


def test_o2a_split_form_accepts_the_good_input():
    loss, num_pos = o2a_per_anchor(O2AArgs(*split_good_input()))
    assert loss.shape == (3,) and num_pos.tolist() == [1, 1, 1]


def test_auto_backend_dispatch():
    from jrcl_fast.losses.dispatch import Impl, select_impl

    cpu = torch.zeros(2, 2)
    assert select_impl("auto", cpu) is Impl.TORCH and select_impl("triton", cpu) is Impl.TRITON
    assert select_impl("torch", cpu) is Impl.TORCH and select_impl(Impl.TRITON, cpu) is Impl.TRITON
    with pytest.raises(ValueError, match="backend must be one of"):
        select_impl("cuda", cpu)
    if torch.cuda.is_available():
        assert select_impl("auto", cpu.cuda()) is Impl.TRITON and select_impl("auto", cpu.double().cuda()) is Impl.TORCH


def test_checks_read_no_values_of_device_tensors():
    """Off the CPU only the shape and dtype checks run, so the loss path never makes the
    host wait for the device. Meta tensors stand in for CUDA ones: reading a value of one
    fails, as it would stall on a GPU."""
    labels = torch.zeros(6, dtype=torch.long, device="meta")
    features = torch.empty(6, 4, device="meta")
    check_o2a_args(features, labels, 0.1, prototypes=torch.empty(3, 4, device="meta"))
    check_o2a_args(features[:2], labels[:2], 0.1, keys=features, key_labels=labels, anchor_offset=2)
    check_labels("labels", labels, 6, 3)
    check_normal_mask(torch.zeros(3, dtype=torch.bool, device="meta"), 3)
    with pytest.raises(ValueError, match="^prototypes must be a N x 4 matrix"):
        check_o2a_args(features, labels, 0.1, prototypes=torch.empty(3, 5, device="meta"))
    with pytest.raises(ValueError, match="^features must be rows 5..6 of keys"):
        check_o2a_args(features[:2], labels[:2], 0.1, keys=features, key_labels=labels, anchor_offset=5)


def test_value_checks_switch_reads_device_tensors(monkeypatch):
    """JRCL_CHECK_VALUES=1 (the debug switch) turns the value checks on for device tensors:
    on meta tensors, which hold no values, the read itself then fails."""
    monkeypatch.setattr(checks, "CHECK_VALUES", True)
    with pytest.raises(RuntimeError, match="meta"):
        check_labels("labels", torch.zeros(6, dtype=torch.long, device="meta"), 6, 3)


def classifier_problem(b=7, c=6):
    """float64 heads that disagree, labels and a normal group of two classes."""
    logits = (2 * torch.randn(b, c, dtype=torch.float64)).requires_grad_()
    binary = (2 * torch.randn(b, 2, dtype=torch.float64)).requires_grad_()
    normal = torch.zeros(c, dtype=torch.bool)
    normal[:2] = True
    return logits, binary, torch.randint(0, c, (b,)), normal


@pytest.mark.parametrize("stop", ["none", "classifier", "binary"])
def test_bdc_stop_grad_keeps_bdc_from_one_head(stop):
    """The gradient equals that of the weighted sum with BDC's input from the stopped
    head held constant (brute force, float64); CE and binary CE still train both."""
    logits, binary, labels, normal = classifier_problem()
    out = ce_bdc_loss(logits, binary, labels, normal, None, 0.6, 1.7, "sym_kl", "torch", stop)
    ce = sum(-torch.log_softmax(logits[i], 0)[labels[i]] for i in range(len(labels))) / len(labels)
    y_bin = [0 if normal[y] else 1 for y in labels]
    bce = sum(-torch.log_softmax(binary[i], 0)[y_bin[i]] for i in range(len(labels))) / len(labels)
    bdc = brute_bdc(logits.detach() if stop == "classifier" else logits,
                    binary.detach() if stop == "binary" else binary, normal, "sym_kl")
    want = ce + 0.6 * bce + 1.7 * bdc
    torch.testing.assert_close(out.total, want)
    for got, expected in zip(grads(out.total, logits, binary), grads(want, logits, binary)):
        torch.testing.assert_close(got, expected)


def test_bdc_stop_grad_choice_is_checked():
    logits, binary, labels, normal = classifier_problem()
    with pytest.raises(ValueError, match="^bdc_stop_grad must be one of 'none', 'classifier', 'binary', got 'both'"):
        ce_bdc_loss(logits, binary, labels, normal, bdc_stop_grad="both")


def count_value_reads(monkeypatch) -> list[str]:
    """Every way Python reads a tensor's value (each one, on a GPU, makes the host wait
    for the device), recorded by name from now on."""
    reads: list[str] = []

    def counted(name, read):
        def wrapper(*args, **kwargs):
            reads.append(name)
            return read(*args, **kwargs)
        return wrapper

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "equal", counted("torch.equal", torch.equal))
    return reads


def test_default_path_reads_no_tensor_values(monkeypatch):
    """Without JRCL_CHECK_VALUES the public losses read no tensor value on the host, in
    the forward or the backward: the argument checks look at shapes, dtypes and
    choices only. (The GPU test_training_losses_never_wait_for_the_gpu checks the
    kernel path with CUDA's sync debug mode.)"""
    monkeypatch.setattr(checks, "CHECK_VALUES", False)
    logits, binary, labels, normal = classifier_problem()
    z, protos = unit_rows(7, 5), unit_rows(6, 5)
    keys, key_labels = torch.cat([z, protos]).detach(), torch.cat([labels, torch.arange(6)])
    reads = count_value_reads(monkeypatch)
    total = ce_bdc_loss(logits, binary, labels, normal, torch.randn(6, dtype=torch.float64), backend="torch").total
    total = total + bdc_loss(logits, binary, normal) + one_to_all_supcon(z, labels, protos, 0.1, backend="torch")
    total = total + o2a_per_anchor(O2AArgs(z, labels, keys, key_labels, 0, 0.1), "torch")[0].sum()
    total.backward()
    assert reads == []
    # The counter sees reads: with the debug switch on, the same calls read values.
    monkeypatch.setattr(checks, "CHECK_VALUES", True)
    one_to_all_supcon(z, labels, protos, 0.1, backend="torch")
    assert reads


def test_o2a_arguments_are_checked_once(monkeypatch):
    """The batch form checks its arguments once, not again as a split form inside."""
    from jrcl_fast.losses import contrastive

    calls = []
    monkeypatch.setattr(contrastive, "check_o2a_args", lambda *args, **kwargs: calls.append(args))
    one_to_all_supcon(unit_rows(4, 3), torch.tensor([0, 1, 0, 1]), unit_rows(2, 3), 0.1, backend="torch")
    assert len(calls) == 1
