"""`jrcl-fast doctor`: is this machine ready for a long run?

It prints the versions that matter and runs short checks of every path that differs on a
GPU: each fused kernel against the PyTorch reference (fp32 and bf16, a small odd shape
and iNaturalist's 8,142 classes), one optimizer step of the real model through DeepSpeed
with the default config (bf16, BatchNorm) and in fp16 with loss scaling, DALI's GPU
decode, and an NCCL all-gather when there are two GPUs. Without a GPU it runs the CPU
parts (the kernels under the Triton interpreter, the DeepSpeed step on the CPU) and lists
every GPU check as skipped, and it times bf16 against fp32 convolutions on the CPU: a
warning, not a failure, where bf16 (the shipped DeepSpeed config) would be much slower.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from jrcl_fast.atomic import atomic_write_bytes
from jrcl_fast.engine.cpu_bf16 import SLOW_BF16_WARNING, bf16_verdict
from jrcl_fast.errors import ConfigWarning

# Largest relative error against float64 on the same (rounded) inputs: fp32 kernels
# accumulate in fp32; bf16 ones also round the probabilities fed to the backward dots.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
SHAPES = {"small odd": {"rows": 37, "dim": 24, "classes": 5}, "C=8142": {"rows": 256, "dim": 128, "classes": 8142}}


@dataclass
class Check:
    name: str
    status: str  # pass | fail | warn (advice: the machine works) | skipped
    seconds: float
    detail: str


def versions() -> dict[str, str | None]:
    def package(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    gpu = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": str(torch.backends.cudnn.version()) if gpu else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if gpu else None,
        "triton": package("triton"),
        "dali": next((v for v in map(package, ("nvidia-dali-cuda130", "nvidia-dali-cuda120")) if v), None),
        "deepspeed": package("deepspeed"),
    }


def gpus() -> list[dict[str, object]]:
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                    "capability": f"{p.major}.{p.minor}"})
    return out


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-12))


Case = Callable[[str], list[torch.Tensor]]


def compare(run: Case, dtype: torch.dtype) -> tuple[bool, str]:
    """`run(backend)` returns the loss and its gradients: the kernel's in `dtype`
    against the reference's in float64 on the same rounded inputs."""
    errors = [relative_error(k, r) for k, r in zip(run("triton"), run("torch"))]
    ok = bool(np.isfinite(errors).all()) and max(errors) <= TOLERANCE[dtype]
    return ok, f"max rel. error {max(errors):.1e} over loss and gradients (limit {TOLERANCE[dtype]:.0e})"


def leaves(device: torch.device, dtype: torch.dtype, backend: str, *xs: torch.Tensor) -> list[torch.Tensor]:
    """Inputs already rounded to `dtype`, on `device`, in `dtype` for the kernel and
    float64 for the reference, with gradients."""
    work = dtype if backend == "triton" else torch.float64
    return [x.to(device=device, dtype=work, copy=True).requires_grad_() for x in xs]


def o2a_case(rows: int, dim: int, classes: int, dtype: torch.dtype, device: torch.device) -> Case:
    from jrcl_fast.losses import one_to_all_supcon

    g = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(rows, dim, generator=g), dim=1).to(dtype)
    prototypes = F.normalize(torch.randn(classes, dim, generator=g), dim=1).to(dtype)
    labels = torch.randint(0, min(classes, 7), (rows,), generator=g).to(device)

    def run(backend: str) -> list[torch.Tensor]:
        f, p = leaves(device, dtype, backend, features, prototypes)
        loss = one_to_all_supcon(f, labels, p, 0.1, True, backend)
        loss.backward()
        return [loss.detach(), f.grad, p.grad]

    return run


def ce_bdc_case(rows: int, dim: int, classes: int, dtype: torch.dtype, device: torch.device) -> Case:
    from jrcl_fast.losses import ce_bdc_loss

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(rows, classes, generator=g)).to(dtype)
    binary = torch.randn(rows, 2, generator=g).to(dtype)
    labels = torch.randint(0, classes, (rows,), generator=g).to(device)
    normal = (torch.arange(classes) == 0).to(device)
    adjustment = torch.randn(classes, generator=g).to(device)

    def run(backend: str) -> list[torch.Tensor]:
        z, b = leaves(device, dtype, backend, logits, binary)
        loss = ce_bdc_loss(z, b, labels, normal, adjustment, 1.0, 1.0, "js", backend).total
        loss.backward()
        return [loss.detach(), z.grad, b.grad]

    return run


def timed(name: str, body: Callable[[], tuple[bool, str]], otherwise: str = "fail") -> Check:
    """Run one check; not ok is `otherwise` (fail, or warn for advice); an exception is a
    failure that names it, not a crash."""
    start = time.perf_counter()
    try:
        ok, detail = body()
        status = "pass" if ok else otherwise
    except Exception as err:  # noqa: BLE001 - every failure is reported, the other checks still run
        status, detail = "fail", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return Check(name, status, time.perf_counter() - start, detail)


def skipped(name: str, why: str) -> Check:
    return Check(name, "skipped", 0.0, why)


def kernel_checks(device: torch.device) -> list[Check]:
    checks = []
    for loss, case in (("O2A", o2a_case), ("CE+BDC", ce_bdc_case)):
        for dtype in (torch.float32, torch.bfloat16):
            for shape, sizes in SHAPES.items():
                name = f"{loss} kernel, {str(dtype).removeprefix('torch.')}, {shape}"
                if device.type != "cuda" and (dtype != torch.float32 or shape != "small odd"):
                    checks.append(skipped(name, "needs a GPU (the interpreter runs the small fp32 case)"))
                    continue
                checks.append(timed(name, lambda case=case, sizes=sizes, dtype=dtype:
                                    compare(case(**sizes, dtype=dtype, device=device), dtype)))
    return checks


FP16_MAX_SKIPPED = 16  # overflow steps while the scale falls from 2^16: a healthy run skips a few


def deepspeed_step(device: torch.device, precision: str, folder: Path) -> tuple[bool, str]:
    """One applied optimizer step of the real model through DeepSpeed on this device:
    the default config (bf16, BatchNorm), the set-up that crashed on the first GPU run, or
    fp16 with loss scaling, whose first steps overflow and are skipped until the scale fits."""
    from jrcl_fast.config import parse_config
    from jrcl_fast.engine.backends import FP16_DEEPSPEED_CONFIG
    from jrcl_fast.engine.run_setup import build_training_stack
    from jrcl_fast.engine.trainer import train_step
    from jrcl_fast.runtime import Ranks

    gpu = device.type == "cuda"
    # ResNet-50 at 64 px on a GPU; ResNet-18 at 16 px keeps the CPU part short.
    backbone, size, batch, classes = ("resnet50", 64, 16, 20) if gpu else ("resnet18", 16, 8, 20)
    train = {"engine": "deepspeed", "batch_size": batch, "epochs": 1}
    if precision == "fp16":
        train["deepspeed_config"] = str(folder / "ds_fp16.json")
        Path(train["deepspeed_config"]).write_text(json.dumps(FP16_DEEPSPEED_CONFIG))
    cfg = parse_config({"data": {"name": "nih_cxr_lt", "root": "unused", "image_size": size},
                        "model": {"backbone": backbone, "small_input_stem": not gpu}, "train": train},
                       "jrcl-fast doctor")
    # The trainer's own set-up of model, optimizer, schedule, engine and objective; its
    # warning about slow bf16 on this CPU is doctor's own check (bf16_verdict).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", f".*{SLOW_BF16_WARNING}", ConfigWarning)
        stack = build_training_stack(cfg, Ranks(), device, classes, np.linspace(1000, 10, classes).astype(int),
                                     np.arange(classes) == 0, steps_per_epoch=1)
    engine, description, objective = stack.engine, stack.description, stack.objective
    before = [p.detach().float().clone() for p in engine.module.parameters()]
    images = torch.randn(batch, cfg.data.num_views, 3, size, size)
    labels = torch.arange(batch) % classes
    start = time.perf_counter()
    terms = train_step(engine, objective, images, labels, device)
    seconds = time.perf_counter() - start
    while engine.skipped_steps == engine.global_steps and engine.skipped_steps < FP16_MAX_SKIPPED:
        terms = train_step(engine, objective, images, labels, device)
    moved = sum(not torch.equal(b, p.detach().float()) for b, p in zip(before, engine.module.parameters()))
    mixed = [name for name, layer in engine.module.named_modules()
             if len({t.dtype for t in (*layer.parameters(False), *layer.buffers(False)) if t.is_floating_point()}) > 1]
    ok = moved > 0 and not mixed and precision in description
    skips = f", {engine.skipped_steps} overflow steps skipped" if precision == "fp16" else ""
    detail = (f"{backbone}, {description}: loss {float(terms['total']):.3f}, {moved} tensors updated, "
              f"step {seconds:.2f} s{skips}" + (f"; layers with mixed dtypes: {', '.join(mixed[:3])}" if mixed else ""))
    return ok, detail


def dali_decode(device: torch.device, folder: Path) -> tuple[bool, str]:
    """Decode a few generated JPEGs with DALI (mixed on a GPU) and compare with PIL."""
    from nvidia.dali import fn, pipeline_def
    from PIL import Image

    rng = np.random.default_rng(0)
    files, pixels = [], []
    for i, (h, w) in enumerate([(48, 64), (80, 40), (33, 57), (64, 64)]):
        smooth = np.kron(rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3)), np.ones((8, 8, 1)))[:h, :w]
        path = folder / f"doctor_{i}.jpg"
        Image.fromarray(smooth.astype(np.uint8)).save(path, quality=95)
        files.append(str(path))
        pixels.append(np.asarray(Image.open(path).convert("RGB"), dtype=np.float64))
    gpu = device.type == "cuda"

    @pipeline_def(batch_size=len(files), num_threads=1, device_id=(device.index or 0) if gpu else None)
    def decode():
        encoded, _ = fn.readers.file(files=files, random_shuffle=False)
        return fn.decoders.image(encoded, device="mixed" if gpu else "cpu")

    pipe = decode()
    pipe.build()
    (out,) = pipe.run()
    decoded = [np.asarray(t, dtype=np.float64) for t in (out.as_cpu() if gpu else out)]
    worst = max(float(np.abs(d - p).mean()) for d, p in zip(decoded, pixels))
    shapes_ok = all(d.shape == p.shape for d, p in zip(decoded, pixels))
    return shapes_ok and worst < 3.0, f"{len(files)} JPEGs, mean |DALI - PIL| <= {worst:.2f} grey levels"


def _nccl_worker(rank: int, world: int, port: int, result: str) -> None:
    import torch.distributed as dist

    from jrcl_fast.compat import all_gather_single

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    out = torch.empty(world, device="cuda")
    all_gather_single(out, torch.full((1,), float(rank), device="cuda"))
    if rank == 0:
        Path(result).write_text(json.dumps(out.tolist()))
    dist.barrier()
    dist.destroy_process_group()


def nccl_all_gather(folder: Path) -> tuple[bool, str]:
    import torch.multiprocessing as mp

    from jrcl_fast.runtime import free_port

    world, result = torch.cuda.device_count(), folder / "nccl.json"
    mp.spawn(_nccl_worker, args=(world, free_port(), str(result)), nprocs=world)
    gathered = json.loads(result.read_text())
    return gathered == [float(r) for r in range(world)], f"{world} GPUs gathered {gathered}"


def run_checks(device: torch.device, installed: dict[str, str | None]) -> list[Check]:
    """Every check on `device`; `installed` is versions(), which says what can run."""
    gpu = device.type == "cuda"
    checks = kernel_checks(device)
    checks.append(timed("bf16 against fp32 convolutions, CPU", bf16_verdict, otherwise="warn"))
    with tempfile.TemporaryDirectory() as tmp:
        name = "DeepSpeed step, default config (bf16, BatchNorm), " + ("GPU" if gpu else "CPU")
        checks.append(timed(name, lambda: deepspeed_step(device, "bf16", Path(tmp))))
        name = "DeepSpeed step, fp16 + loss scaling, ZeRO stage 1, GPU"
        checks.append(timed(name, lambda: deepspeed_step(device, "fp16", Path(tmp))) if gpu
                      else skipped(name, "needs a GPU (DeepSpeed's CPU backend has no fp16)"))
        if installed["dali"] is None:
            checks.append(skipped("DALI decode", "DALI not installed: skipped"))
        else:
            checks.append(timed("DALI " + ("mixed (GPU)" if gpu else "CPU") + " decode",
                                lambda: dali_decode(device, Path(tmp))))
            if not gpu:
                checks.append(skipped("DALI mixed (GPU) decode", "needs a GPU"))
        count = torch.cuda.device_count() if gpu else 0
        if count >= 2:
            checks.append(timed("NCCL all-gather", lambda: nccl_all_gather(Path(tmp))))
        else:
            checks.append(skipped("NCCL all-gather", f"needs 2 or more GPUs, found {count}"))
    return checks


def report(info: dict, checks: list[Check], console: Console) -> None:
    console.print("  ".join(f"[bold]{k}[/] {v or '-'}" for k, v in info["versions"].items()), highlight=False)
    for gpu in info["gpus"]:
        console.print(f"GPU {gpu['index']}: {gpu['name']}, {gpu['memory_gib']} GiB, sm_{gpu['capability']}")
    if not info["gpus"]:
        console.print("No GPU: the CPU parts run; every GPU check is listed as skipped.")
    table = Table(title="jrcl-fast doctor")
    for column in ("check", "result", "time", "detail"):
        table.add_column(column, justify="right" if column == "time" else "left")
    colours = {"pass": "green", "fail": "bold red", "warn": "bold yellow", "skipped": "yellow"}
    for c in checks:
        table.add_row(c.name, f"[{colours[c.status]}]{c.status}[/]", f"{c.seconds:.1f} s", c.detail)
    console.print(table)


def doctor(out: Path | None, console: Console) -> bool:
    """Run every check, print the table, write JSON to `out`; True when nothing failed."""
    from jrcl_fast.runtime import Ranks, select_device

    device = select_device("auto", Ranks())
    if device.type != "cuda":
        # Without a GPU the kernels run under the Triton interpreter, which must be
        # chosen before they are imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    start, installed = time.perf_counter(), versions()
    checks = run_checks(device, installed)
    info = {"versions": installed, "gpus": gpus(), "argv": sys.argv, "seconds": time.perf_counter() - start,
            "checks": [asdict(c) for c in checks], "ok": all(c.status != "fail" for c in checks)}
    report(info, checks, console)
    if out is not None:
        atomic_write_bytes(out, lambda f: f.write(json.dumps(info, indent=2).encode()))
    return info["ok"]
