"""Communication per optimizer step of data-parallel JRCL: the features all-gather of the
global contrastive batch vs the gradient all-reduce, from the model's real sizes.

    python benchmarks/scaling.py --config configs/inat2018.yaml --classes 8142

Prints the sizes and per-step bytes that docs/SCALING.md tabulates.
"""

from __future__ import annotations

import argparse

from jrcl_fast.config import load_config
from jrcl_fast.models import JRCLNet

MB = 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/inat2018.yaml")
    parser.add_argument("--classes", type=int, default=8142, help="iNaturalist 2018 has 8,142")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--grad-bytes", type=int, default=2, help="2: bf16 gradients, 4: fp32")
    args = parser.parse_args()
    cfg = load_config(args.config)
    model = JRCLNet(cfg.model, args.classes)
    parts = {"backbone": model.backbone, "classifier": model.classifier, "binary head": model.binary_head,
             "projection": model.projection}
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
    counts["prototypes"] = model.prototypes.numel()
    total = sum(counts.values())
    print("| part | parameters |\n|---|---:|")
    for name, n in counts.items():
        print(f"| {name} | {n:,} |")
    print(f"| **total P** | **{total:,}** |\n")

    b, v, d = cfg.train.batch_size, cfg.data.num_views, cfg.model.projection_dim
    print(f"micro batch b = {b} per rank, V = {v} views, D = {d}; features gathered in fp32 (4 B), "
          f"gradients {args.grad_bytes} B.\n")
    print("| ranks W | global contrastive batch W·b·V (keys) | features all-gather, received per rank "
          "(W-1)·b·V·D·4 | + its backward reduce-scatter | gradient all-reduce per rank 2·(W-1)/W·P·B "
          "| all-gather / all-reduce |")
    print("|---:|---:|---:|---:|---:|---:|")
    for w in args.ranks:
        keys = w * b * v
        gather = (w - 1) * b * v * d * 4
        allreduce = 2 * (w - 1) / w * total * args.grad_bytes
        print(f"| {w} | {keys:,} (+{args.classes:,} prototypes) | {gather / MB:.1f} MB | {gather / MB:.1f} MB "
              f"| {allreduce / MB:.1f} MB | {2 * gather / allreduce:.2f} |")


if __name__ == "__main__":
    main()
