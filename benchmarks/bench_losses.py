"""JRCL loss kernels: PyTorch eager reference vs torch.compile of it vs the fused Triton kernels.

Times forward, backward and forward+backward of the O2A contrastive loss (N features
against [features; C prototypes], D = 128) and of CE + binary CE + BDC (B = N rows,
C classes), in float32 and bfloat16, with CUDA events (warm-up, then the median of
many repeats), and the peak memory each adds. Each row is set against its floor:
the least time the op's FLOPs take at the measured matmul rate, or its minimal
bytes at the measured copy bandwidth, whichever is larger.

    python benchmarks/bench_losses.py --quick --out losses.json   # reduced sweep
    python benchmarks/bench_losses.py --out losses.json           # N x C x dtype sweep

Without a GPU only the eager reference runs, on small shapes, as a smoke test: the
kernel and torch.compile figures need a CUDA device. Not a test: docs/BENCHMARKS.md
records the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import Tensor

from jrcl_fast.kernels.specs import CEBDCArgs, O2AArgs
from jrcl_fast.losses.reference import ce_bdc_reference, o2a_per_anchor_reference
from jrcl_fast.models.jrcl_net import LOGIT_ROW_ALIGNMENT

if TYPE_CHECKING:  # imported by --peers alone: the peers are an optional extra
    from loss_peers import Problem

DIM = 128
TEMPERATURE = 0.1
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    loss: str  # "o2a" or "ce_bdc"
    n: int  # features (O2A) or rows (CE+BDC)
    classes: int
    dtype: str


@dataclass
class Row:
    loss: str
    impl: str
    n: int
    classes: int
    dim: int
    dtype: str
    mode: str
    ms: float | None  # median; None when the row did not run
    peak_mib: float | None
    flops: float
    bytes: float
    floor_ms: float | None  # None without a GPU (no measured rates)
    x_floor: float | None  # achieved time / floor time (1 = at the roofline)
    status: str  # "ok", "OOM" or the error


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
    return f"CPU: {model}"


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_ms(run: Callable[[], None], before: Callable[[], None], warmup: int, repeats: int) -> float:
    """Median time of `run`, with `before` (untimed) ahead of each call. CUDA events
    on a GPU; wall clock after a synchronize otherwise."""
    for _ in range(warmup):
        before()
        run()
    times = []
    for _ in range(repeats):
        before()
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def machine_rates(quick: bool) -> dict[str, float]:
    """Matmul FLOP/s per dtype (float32 without TF32: the IEEE rate, which the fused O2A
    kernel's default tf32x3 dots, on the tensor cores, can beat, giving x floor < 1)
    and copy bandwidth (bytes read + written per second) of this GPU."""
    size = 4096 if quick else 8192
    rates = {}
    for name, dtype in DTYPES.items():
        a = torch.randn(size, size, device="cuda", dtype=dtype)
        b = torch.randn(size, size, device="cuda", dtype=dtype)
        ms = median_ms(lambda a=a, b=b: a @ b, lambda: None, 3, 10)
        rates[f"matmul_{name}_flops"] = 2 * size**3 / (ms * 1e-3)
    src = torch.empty(1 << 28, device="cuda")  # 1 GiB of float32
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), lambda: None, 3, 10)
    rates["copy_bytes_per_s"] = 2 * src.numel() * src.element_size() / (ms * 1e-3)
    return rates


def o2a_setup(case: Case, device: str) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """(inputs, the inputs whose gradient is timed): unit-norm features with labels over C
    classes and C prototypes."""
    dtype = DTYPES[case.dtype]
    features = F.normalize(torch.randn(case.n, DIM, device=device), dim=1).to(dtype).requires_grad_()
    prototypes = F.normalize(torch.randn(case.classes, DIM, device=device), dim=1).to(dtype).requires_grad_()
    labels = torch.randint(0, case.classes, (case.n,), device=device)
    key_labels = torch.cat([labels, torch.arange(case.classes, device=device)])
    return (features, prototypes, labels, key_labels), (features, prototypes)


def o2a_objective(per_anchor: Callable) -> Callable[..., Tensor]:
    """The training use: features are anchors and keys, prototypes extra keys."""

    def objective(features: Tensor, prototypes: Tensor, labels: Tensor, key_labels: Tensor) -> Tensor:
        keys = torch.cat([features, prototypes])
        loss, num_pos = per_anchor(O2AArgs(features, labels, keys, key_labels, 0, TEMPERATURE, True))
        return loss.sum() / (num_pos > 0).sum().clamp(min=1)

    return objective


def ce_bdc_setup(case: Case, device: str, padded_rows: bool = True) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Logits as the model hands them to the loss: a view of rows padded to a multiple of
    LOGIT_ROW_ALIGNMENT classes (16-byte aligned in bf16), or with `padded_rows=False`
    dense rows of C classes (C = 8,142 bf16 rows are not 16-byte aligned)."""
    dtype = DTYPES[case.dtype]
    width = case.classes + (-case.classes % LOGIT_ROW_ALIGNMENT if padded_rows else 0)
    rows = (3 * torch.randn(case.n, width, device=device)).to(dtype).requires_grad_()
    logits = rows[:, : case.classes]
    binary_logits = torch.randn(case.n, 2, device=device).to(dtype).requires_grad_()
    labels = torch.randint(0, case.classes, (case.n,), device=device)
    normal_mask = torch.arange(case.classes, device=device) < max(1, case.classes // 3)
    adjustment = torch.log_softmax(torch.randn(case.classes, device=device), 0)  # log priors
    return (logits, binary_logits, labels, normal_mask, adjustment), (logits, binary_logits)


def ce_bdc_objective(fn: Callable) -> Callable[..., Tensor]:
    return lambda *inputs: fn(CEBDCArgs(*inputs))[0]


def floor(case: Case, mode: str, rates: dict[str, float] | None) -> tuple[float, float, float | None]:
    """(FLOPs, bytes, floor ms) of the op itself. O2A: one N x M x D matmul forward
    and two backward (dA, dK), with M = N + C; reading (and for the backward writing)
    the N + M rows once. CE+BDC: memory-bound, reading the logits once forward and
    writing their gradient once backward (its few FLOPs per logit are not counted)."""
    elem = DTYPES[case.dtype].itemsize
    fwd, bwd = mode != "bwd", mode != "fwd"
    if case.loss == "o2a":
        m = case.n + case.classes
        flops = 2 * case.n * m * DIM * (fwd + 2 * bwd)
        nbytes = (case.n + m) * DIM * elem * (fwd + 2 * bwd)
    else:
        flops = 0.0
        nbytes = case.n * case.classes * elem * (fwd + bwd)
    if rates is None:
        return flops, nbytes, None
    seconds = max(flops / rates[f"matmul_{case.dtype}_flops"], nbytes / rates["copy_bytes_per_s"])
    return flops, nbytes, seconds * 1e3


def measure(objective: Callable[..., Tensor], inputs: tuple, wrt: tuple, mode: str, warmup: int,
            repeats: int) -> tuple[float, float | None]:
    """Median ms and peak MiB allocated beyond the inputs for one mode. The backward is
    torch.autograd.grad to `wrt`: the loss's own gradients, without accumulating them into
    .grad (a copy for the padded logits' view) or going on into the model's layers."""
    holder: dict[str, Tensor] = {}

    def prepare() -> None:
        holder.pop("grads", None)
        if mode == "bwd":
            holder["out"] = objective(*inputs)

    def backward(out: Tensor) -> None:
        holder["grads"] = torch.autograd.grad(out, wrt)

    run = {
        "fwd": lambda: objective(*inputs),
        "bwd": lambda: backward(holder.pop("out")),
        "fwd+bwd": lambda: backward(objective(*inputs)),
    }[mode]
    ms = median_ms(run, prepare, warmup, repeats)
    if not torch.cuda.is_available():
        return ms, None
    gc.collect()
    prepare()  # for "bwd" the forward graph is part of the baseline
    synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    synchronize()
    holder.clear()
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**20


def try_measure(objective: Callable[..., Tensor], make_inputs: Callable[[], tuple[tuple, tuple]], mode: str,
                warmup: int, repeats: int) -> tuple[float | None, float | None, str]:
    """measure() on fresh inputs: (ms, peak MiB, status), with an out-of-memory or any
    other error reported as the row's status rather than ending the sweep."""
    ms = peak = None
    try:
        inputs, wrt = make_inputs()
        ms, peak = measure(objective, inputs, wrt, mode, warmup, repeats)
        status = "ok"
    except torch.cuda.OutOfMemoryError:
        status = "OOM"
    except Exception as error:  # a failing row is reported, not fatal to the sweep
        status = f"error: {type(error).__name__}: {error}".splitlines()[0][:200]
    inputs = wrt = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return ms, peak, status


def implementations(loss: str, gpu: bool) -> dict[str, Callable[..., Tensor]]:
    if loss == "o2a":
        reference, wrap = o2a_per_anchor_reference, o2a_objective
    else:
        reference, wrap = ce_bdc_reference, ce_bdc_objective
    impls = {"eager": wrap(reference)}
    if gpu:
        from jrcl_fast.kernels.ce_bdc import fused_ce_bdc
        from jrcl_fast.kernels.o2a import fused_o2a_per_anchor

        impls["compile"] = wrap(torch.compile(reference, dynamic=False))
        impls["triton"] = wrap(fused_o2a_per_anchor if loss == "o2a" else fused_ce_bdc)
    return impls


def sweep(quick: bool, gpu: bool, args: argparse.Namespace) -> list[Case]:
    """The default N x C x dtype grid for this machine; --sizes, --classes, --dtypes and
    --losses replace its axes."""
    if gpu:
        sizes, classes, dtypes = ((4096,), (20, 8142), ("fp32", "bf16")) if quick else (
            (4096, 16384, 65536), (20, 365, 8142), ("fp32", "bf16"))
    else:  # the eager reference on shapes a CPU finishes in seconds
        sizes, classes, dtypes = ((256,), (20, 365), ("fp32",)) if quick else ((256, 1024), (20, 365), ("fp32",))
    sizes, classes, dtypes = args.sizes or sizes, args.classes or classes, args.dtypes or dtypes
    return [Case(loss, n, c, d) for loss in args.losses for n in sizes for c in classes for d in dtypes]


def run_case(case: Case, gpu: bool, rates: dict[str, float] | None, warmup: int, repeats: int,
             impls: list[str] | None = None, padded_rows: bool = True) -> list[Row]:
    device = "cuda" if gpu else "cpu"
    setup = o2a_setup if case.loss == "o2a" else partial(ce_bdc_setup, padded_rows=padded_rows)
    torch._dynamo.reset()  # fresh compile per shape: no recompile limit falls back to eager
    rows = []
    for impl, objective in implementations(case.loss, gpu).items():
        if impls and impl not in impls:
            continue
        for mode in MODES:
            flops, nbytes, floor_ms = floor(case, mode, rates)
            ms, peak, status = try_measure(objective, lambda: setup(case, device), mode, warmup, repeats)
            x_floor = ms / floor_ms if ms is not None and floor_ms else None
            rows.append(Row(case.loss, impl, case.n, case.classes, DIM, case.dtype, mode, ms, peak,
                            flops, nbytes, floor_ms, x_floor, status))
    return rows


def print_table(console: Console, rows: list[Row], device: str) -> None:
    table = Table(title=f"JRCL loss kernels on {device} (D = {DIM}; median ms)")
    for column in ("loss", "impl", "N", "C", "dtype", "mode", "ms", "peak MiB", "GFLOP", "MB", "floor ms", "x floor"):
        table.add_column(column, justify="left" if column in ("loss", "impl", "dtype", "mode") else "right")

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for r in rows:
        ms = num(r.ms, ".3f") if r.status == "ok" else r.status
        table.add_row(r.loss, r.impl, str(r.n), str(r.classes), r.dtype, r.mode, ms, num(r.peak_mib, ".1f"),
                      num(r.flops / 1e9, ".1f"), num(r.bytes / 1e6, ".1f"), num(r.floor_ms, ".3g"),
                      num(r.x_floor, ".1f"))
    console.print(table)


def autotuned_tiles() -> list[dict[str, object]]:
    """The tile Triton's autotuner kept for each O2A pass and launch shape in this run
    (none without a GPU, where the kernels are not autotuned)."""
    from triton.runtime.autotuner import Autotuner

    from jrcl_fast.kernels import o2a

    tiles = []
    for pass_name in o2a.PASSES:
        kernel = getattr(o2a, f"_o2a_{pass_name}_kernel")
        if isinstance(kernel, Autotuner):
            tiles += [{"pass": pass_name, "key": [str(part) for part in key], "tile": str(config)}
                      for key, config in kernel.cache.items()]
    return tiles


def print_tiles(console: Console, tiles: list[dict[str, object]]) -> None:
    table = Table(title="O2A tiles kept by the autotuner (key: n, M, D, then the variant flags and dtypes)")
    for column in ("pass", "key", "tile"):
        table.add_column(column)
    for tile in tiles:
        table.add_row(str(tile["pass"]), ", ".join(tile["key"]), str(tile["tile"]))
    console.print(table)


@dataclass
class PeerRow:
    problem: str  # a loss_peers.PROBLEMS name: what each side computes is in the run's "problems"
    peer: str
    n: int
    classes: int | None  # None where the problem has no classes (InfoNCE vs O2A)
    dtype: str
    mode: str
    peer_ms: float | None
    ours_ms: float | None
    ratio: float | None  # peer ms / ours ms: above 1, ours is faster
    peer_peak_mib: float | None
    ours_peak_mib: float | None
    peer_ns_per_element: float | None  # per element of the problem (a similarity, a logit)
    ours_ns_per_element: float | None
    status: str


def peer_rows(problem: Problem, n: int, classes: int, dtype: str, warmup: int, repeats: int,
              device: str = "cuda") -> list[PeerRow]:
    """The peer and ours on fresh inputs of one shape, each mode (on the GPU; the CPU
    only tests this code)."""
    def make_inputs() -> tuple[tuple, tuple]:
        return problem.setup(n, classes, dtype, device)

    def peer_inputs() -> tuple[tuple, tuple]:  # the gradients the peer's backward produces
        inputs, wrt = make_inputs()
        return inputs, wrt[: problem.peer_wrt]

    elements = problem.elements(n, classes)
    rows = []
    for mode in MODES:
        peer_ms, peer_peak, peer_status = try_measure(problem.peer_fn, peer_inputs, mode, warmup, repeats)
        ours_ms, ours_peak, ours_status = try_measure(problem.ours_fn, make_inputs, mode, warmup, repeats)
        status = "ok" if peer_status == ours_status == "ok" else f"peer {peer_status}; ours {ours_status}"
        rows.append(PeerRow(problem.name, problem.peer, n, classes if problem.classes_used else None, dtype, mode,
                            peer_ms, ours_ms, peer_ms / ours_ms if peer_ms and ours_ms else None, peer_peak, ours_peak,
                            peer_ms and peer_ms * 1e6 / elements, ours_ms and ours_ms * 1e6 / elements, status))
    return rows


def print_peer_tables(console: Console, problems: tuple[Problem, ...], checks: list[dict], rows: list[PeerRow],
                      device: str) -> None:
    for problem in problems:
        console.print(f"[bold]{problem.name}[/] ({problem.peer}): peer = {problem.peer_computes}; "
                      f"ours = {problem.ours_computes}")
    table = Table(title="Peers: do the compared quantities agree? (worst relative error vs float64)")
    for column in ("problem", "claim", "status", "value err", "grad err"):
        table.add_column(column)
    for check in checks:
        grads = check.get("grad_errors")
        table.add_row(check["problem"], check["claim"], check["status"],
                      format(check["value_error"], ".1e") if "value_error" in check else "-",
                      ", ".join(format(e, ".1e") for e in grads) if grads else "-")
    console.print(table)
    for check in checks:
        if "kernel_gpu_only" in check:
            console.print(f"[yellow]{check['problem']}: the peer's kernel is GPU-only ({check['kernel_gpu_only']}); "
                          f"checked here: {check['claim']}[/]")
    if not rows:
        return
    table = Table(title=f"Peers and ours on {device} (median ms; ratio = peer / ours)")
    for column in ("problem", "N", "C", "dtype", "mode", "peer ms", "ours ms", "ratio", "peer MiB", "ours MiB",
                   "peer ns/elem", "ours ns/elem", "status"):
        table.add_column(column, justify="left" if column in ("problem", "dtype", "mode", "status") else "right")

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for r in rows:
        table.add_row(r.problem, str(r.n), num(r.classes, "d"), r.dtype, r.mode, num(r.peer_ms, ".3f"),
                      num(r.ours_ms, ".3f"), num(r.ratio, ".2f"), num(r.peer_peak_mib, ".1f"),
                      num(r.ours_peak_mib, ".1f"), num(r.peer_ns_per_element, ".4f"),
                      num(r.ours_ns_per_element, ".4f"), r.status)
    console.print(table)


def run_peers(args: argparse.Namespace, console: Console, gpu: bool, warmup: int, repeats: int) -> dict:
    """--peers: the correctness checks everywhere, the timed rows on a GPU (loss_peers.py)."""
    import loss_peers

    missing = loss_peers.missing_peers()
    if missing:
        raise SystemExit(f"bench_losses.py --peers: {', '.join(missing)} not installed; "
                         "run pip install -e '.[peers]' (setup.py pins the versions)")
    checks = loss_peers.run_checks("cuda" if gpu else "cpu")
    rows = []
    if gpu:
        sizes = args.sizes or ((16384,) if args.quick else (16384, 131072))
        for problem in loss_peers.PROBLEMS:
            for n in sizes:
                for classes in (args.classes or (8142,)) if problem.classes_used else (0,):
                    for dtype in args.dtypes or ("bf16", "fp32"):
                        console.print(f"[dim]{problem.name} N={n} C={classes} {dtype}[/]")
                        rows += peer_rows(problem, n, classes, dtype, warmup, repeats)
    else:
        console.print("[bold yellow]No CUDA GPU: the peers' correctness checks run (GPU-only ones say why); "
                      "their timed rows need a GPU.[/]")
    print_peer_tables(console, loss_peers.PROBLEMS, checks, rows, device_name())
    return {"peer_versions": loss_peers.installed_versions(),
            "problems": [{"name": p.name, "peer": p.peer, "peer_computes": p.peer_computes,
                          "ours_computes": p.ours_computes, "element": p.element}
                         for p in loss_peers.PROBLEMS],
            "checks": checks, "rows": [asdict(r) for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced sweep")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (median reported)")
    parser.add_argument("--sizes", type=int, nargs="+", help="N values instead of the default grid's")
    parser.add_argument("--classes", type=int, nargs="+", help="C values instead of the default grid's")
    parser.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), help="dtypes instead of the default grid's")
    parser.add_argument("--losses", nargs="+", choices=("o2a", "ce_bdc"), default=["o2a", "ce_bdc"])
    parser.add_argument("--impls", nargs="+", choices=("eager", "compile", "triton"),
                        help="implementations to time (default: every one the machine runs)")
    parser.add_argument("--logit-rows", choices=("padded", "dense"), default="padded",
                        help="CE+BDC logits as a view of rows padded to a multiple of "
                             f"{LOGIT_ROW_ALIGNMENT} classes, as the model hands them (default), or dense rows")
    parser.add_argument("--peers", action="store_true",
                        help="instead of the sweep: Inf-CL, Liger-Kernel and CCE beside ours (loss_peers.py), "
                             "their correctness checks first; --sizes, --classes, --dtypes choose the shapes")
    args = parser.parse_args()

    console = Console(width=None if sys.stdout.isatty() else 160)  # the table is wide; logs are not terminals
    gpu = torch.cuda.is_available()
    device = device_name()
    # CPU shapes are tiny: many repeats are cheap and the median rides out a busy machine.
    warmup, repeats = (3, args.repeats or (10 if args.quick else 30)) if gpu else (3, args.repeats or 15)
    if args.peers and not gpu and os.environ.get("TRITON_INTERPRET") != "1":
        # The peers' Triton kernels run on a CPU under the interpreter, which must be on
        # before Triton is first imported (it is, above): this run again, with it on.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "TRITON_INTERPRET": "1"})
    if args.peers:
        result = run_peers(args, console, gpu, warmup, repeats)
        write_json(args.out, {"device": device, "torch": torch.__version__, "triton": triton_version(),
                              "gpu_figures": gpu, **result}, console)
        if any(check["status"] == "FAILED" for check in result["checks"]):
            raise SystemExit("bench_losses.py --peers: a peer and ours disagree (the FAILED checks above)")
        return
    if not gpu:
        console.print("[bold yellow]No CUDA GPU: only the eager PyTorch reference runs, on small shapes, as a "
                      "smoke test. The fused-kernel and torch.compile figures need a GPU.[/]")
    rates = machine_rates(args.quick) if gpu else None
    if rates:
        console.print("matmul TFLOP/s: " + ", ".join(f"{k.split('_')[1]} {v / 1e12:.1f}" for k, v in rates.items()
                                                      if k.startswith("matmul"))
                      + f"; copy bandwidth {rates['copy_bytes_per_s'] / 1e9:.0f} GB/s")
    rows = []
    for case in sweep(args.quick, gpu, args):
        console.print(f"[dim]{case}[/]")
        rows += run_case(case, gpu, rates, warmup, repeats, args.impls, args.logit_rows == "padded")
    print_table(console, rows, device)
    tiles = autotuned_tiles() if gpu else []
    if tiles:
        print_tiles(console, tiles)
    write_json(args.out, {
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version(),
        "rates": rates,
        "gpu_figures": gpu,
        "ce_bdc_logit_rows": args.logit_rows,
        "o2a_autotuned_tiles": tiles,
        "rows": [asdict(r) for r in rows],
    }, console)


def write_json(path: Path | None, result: dict, console: Console) -> None:
    if path:
        path.write_text(json.dumps(result, indent=1))
        console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
