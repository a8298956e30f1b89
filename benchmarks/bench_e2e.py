"""End-to-end training throughput: ResNet-50 at 224 px with the full JRCL objective vs the
same backbone with plain cross-entropy, side by side in one run.

A step is forward, backward and an SGD step on synthetic images already on the device
(the data pipeline is measured by bench_data.py). JRCL runs both views of each image
through the backbone, so it does twice the backbone work per image; the overhead of the
JRCL losses is therefore read against CE on the same two views (equal backbone work).

    python benchmarks/bench_e2e.py --out e2e.json          # GPU: batch 128 per step, bf16 autocast
    python benchmarks/bench_e2e.py --quick --out e2e.json  # CPU: batch 4, a few steps, fp32
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from jrcl_fast.config import LossConfig, ModelConfig
from jrcl_fast.losses.objective import JRCLObjective
from jrcl_fast.models import JRCLNet


def images_per_s(step: Callable[[], None], batch: int, warmup: int, steps: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU-sized: batch 4, 1 warmup + 2 timed steps")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch or (4 if args.quick else 128)
    warmup, steps = (1, 2) if args.quick else (5, 20)
    views, size = 2, args.image_size
    # Half precision on a GPU, as training runs there; fp32 on the CPU.
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    torch.manual_seed(0)
    images = torch.randn(batch, views, 3, size, size, device=device)
    labels = torch.randint(0, args.classes, (batch,), device=device)

    model = JRCLNet(ModelConfig(backbone="resnet50", projection_dim=128, projection_hidden_dim=2048),
                    args.classes).to(device)
    counts = np.maximum(1000 // (1 + np.arange(args.classes)), 1)
    normal = np.zeros(args.classes, dtype=bool)
    normal[: args.classes // 10] = True
    objective = JRCLObjective(LossConfig(), counts, normal, device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def jrcl_step() -> None:
        with autocast:
            out = model(images.transpose(0, 1).reshape(views * batch, 3, size, size))
        loss, _ = objective(out.logits.float(), out.binary_logits.float(), out.features.float(), labels, views,
                            model.normalized_prototypes().float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    plain = torch.nn.Sequential(model.backbone, model.classifier)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9)

    def ce_step(num_views: int) -> Callable[[], None]:
        def step() -> None:
            with autocast:
                logits = plain(images[:, :num_views].transpose(0, 1).reshape(num_views * batch, 3, size, size))
            loss = F.cross_entropy(logits.float(), labels.repeat(num_views))
            plain_opt.zero_grad(set_to_none=True)
            loss.backward()
            plain_opt.step()
        return step

    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "CPU"
    rates = {
        "ResNet-50 + CE, 1 view": images_per_s(ce_step(1), batch, warmup, steps, device),
        "ResNet-50 + CE, 2 views": images_per_s(ce_step(2), batch, warmup, steps, device),
        "ResNet-50 + JRCL, 2 views (CE + binary CE + BDC + O2A)": images_per_s(jrcl_step, batch, warmup, steps,
                                                                                device),
    }
    same_work = rates["ResNet-50 + CE, 2 views"]
    table = Table(title=f"{name}: batch {batch} images, {size} px, {args.classes} classes, {steps} timed steps")
    for column in ("objective", "images/s", "JRCL-loss overhead vs CE on 2 views"):
        table.add_column(column, justify="right")
    rows = []
    for label, rate in rates.items():
        overhead = same_work / rate - 1 if "JRCL" in label else None
        rows.append({"objective": label, "images_per_s": rate, "overhead_vs_ce_2_views": overhead})
        table.add_row(label, f"{rate:.2f}", "-" if overhead is None else f"{100 * overhead:+.1f}%")
    Console().print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "batch": batch, "image_size": size, "classes": args.classes,
                       "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
