"""The fair ablation: every variant with the same data, seeds, budget and selection rule,
its loss weights chosen on the validation split, the test split reported once.

1. Grid: each variant trains once per point of its small weight grid (seed 0), selecting
   the epoch on validation balanced accuracy; the point with the best validation score
   is that variant's weights.
2. Seeds: each variant trains with its chosen weights on every seed (the grid's seed-0
   run is reused). The test metrics of the selected epochs are reported as the mean
   and a 95% t-interval over seeds.

Each run is a plain `jrcl-fast train` with `--set` overrides, so the ablation measures
what a user runs. A run's folder is named by its variant, grid point, seed and a hash of
all its overrides, and one that already holds results.json is reused: an interrupted
ablation resumes, and a changed budget or variant starts new runs rather than mixing
old ones in (start from an empty --out after changing the code). `--jobs N` runs N at a
time, each with cpu_count // N torch threads: the grid points all at once, then the seeds.
Writes JSON (one entry per variant and seed) and a Markdown table, and prints the table.

    python benchmarks/ablation.py --config configs/mnist_lt.yaml --seeds 0 1 2 3 4 \\
        --out runs/mnist_lt_ablation --json docs/results/mnist_lt_ablation.json
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from scipy import stats


@dataclass(frozen=True)
class Variant:
    name: str
    fixed: dict[str, object]  # config keys every run of the variant sets
    grid: dict[str, list[object]] = field(default_factory=dict)  # weights chosen on validation


NO_AUX = {"loss.lambda_con": 0, "loss.lambda_bin": 0, "loss.lambda_bdc": 0}
CON = [0.1, 0.35]  # λ_con
LA = [0.5, 1.0]  # τ of logit adjustment (Menon et al. 2021 use 1.0)
VARIANTS = [
    Variant("CE", NO_AUX),
    Variant("logit-adjusted CE", NO_AUX, {"loss.logit_adjust_tau": LA}),
    Variant("CE + SupCon", {"loss.lambda_bin": 0, "loss.lambda_bdc": 0, "loss.use_prototypes": False,
                            "loss.class_average": False}, {"loss.lambda_con": CON}),
    Variant("CE + O2A", {"loss.lambda_bin": 0, "loss.lambda_bdc": 0}, {"loss.lambda_con": CON}),
    Variant("JRCL", {}, {"loss.lambda_con": CON, "loss.lambda_bdc": [0.3, 1.0]}),
    Variant("JRCL + logit adjustment", {}, {"loss.logit_adjust_tau": LA}),
    Variant("JRCL, λ_bin = 0", {"loss.lambda_bin": 0}, {"loss.lambda_bdc": [0.3, 1.0]}),
]
METRICS = [("balanced_accuracy", "balanced acc"), ("many", "many"), ("medium", "medium"), ("few", "few"),
           ("normal_vs_abnormal_accuracy", "normal vs abnormal"), ("top1", "top-1")]


def grid_points(variant: Variant) -> list[dict[str, object]]:
    keys = list(variant.grid)
    return [dict(zip(keys, values)) for values in itertools.product(*variant.grid.values())]


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def train(config: str, settings: dict[str, object], extra: list[str], seed: int, out_dir: Path) -> dict:
    """One run; returns its test metrics and its validation score."""
    if not (out_dir / "results.json").exists():
        cmd = [sys.executable, "-m", "jrcl_fast", "train", "--config", config, "--overwrite",
               "--set", f"train.seed={seed}", "--set", f"train.output_dir={out_dir}",
               "--set", "train.select_on=val_balanced_accuracy"]
        for key, value in settings.items():
            cmd += ["--set", f"{key}={json.dumps(value)}"]
        for assignment in extra:
            cmd += ["--set", assignment]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    results = json.loads((out_dir / "results.json").read_text())
    test = {key: results[key] for key in ("balanced_accuracy", "top1", "macro_f1", "normal_vs_abnormal_accuracy")}
    selection = results["selection"]
    return {"val": {"balanced_accuracy": selection["best_value"], "epoch": selection["best_epoch"]},
            "test": test | results["shot_accuracy"]}


def interval(values: list[float | None]) -> dict[str, float | None]:
    """Mean and the half-width of its 95% t-interval (0 for one seed), over the seeds that
    have the metric (None: a data set without a named normal class, a shot group without
    test classes)."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "ci95": None}
    mean = float(np.mean(values))
    if len(values) < 2:
        return {"mean": mean, "ci95": 0.0}
    half = stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values))
    return {"mean": mean, "ci95": float(half)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist_lt.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=Path("runs/mnist_lt_ablation"))
    parser.add_argument("--json", type=Path, help="also write the JSON here (default: OUT/ablation.json)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time; each gets cpu_count // jobs torch threads")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run, e.g. to size the budget")
    args = parser.parse_args()

    console, start = Console(), time.perf_counter()
    extra = args.extra
    if args.jobs > 1:  # split the cores between the concurrent runs (a --set of yours wins)
        extra = [f"train.threads={max(1, (os.cpu_count() or 1) // args.jobs)}", *extra]
    grid_seed, other_seeds = args.seeds[0], args.seeds[1:]
    grid = [(variant, point) for variant in VARIANTS for point in grid_points(variant)]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    pool = ThreadPoolExecutor(args.jobs)
    try:
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("ablation: grid", total=len(grid) + len(VARIANTS) * len(other_seeds))

            def run(settings: dict[str, object], seed: int, folder: Path) -> dict:
                result = train(args.config, settings, extra, seed, folder)
                progress.advance(task)
                return result

            # 1. every grid point of every variant on the first seed, concurrently
            grid_runs: dict[str, list[tuple[dict, Path, Future]]] = {variant.name: [] for variant in VARIANTS}
            for variant, point in grid:
                settings = json.dumps([variant.fixed, point, args.config, args.extra], sort_keys=True)
                name = f"{slug(json.dumps(point)) or 'defaults'}-{hashlib.sha1(settings.encode()).hexdigest()[:8]}"
                folder = args.out / slug(variant.name) / name
                future = pool.submit(run, variant.fixed | point, grid_seed, folder / f"seed{grid_seed}")
                grid_runs[variant.name].append((point, folder, future))
            chosen: dict[str, dict] = {}
            best: dict[str, tuple[dict, Path]] = {}
            for variant in VARIANTS:
                scored = [(future.result(), point, folder) for point, folder, future in grid_runs[variant.name]]
                result, chosen[variant.name], folder = max(scored, key=lambda s: s[0]["val"]["balanced_accuracy"])
                best[variant.name] = (result, folder)
            # 2. each variant's chosen weights on the other seeds (the grid's run is reused)
            progress.update(task, description="ablation: seeds")
            seed_runs = {(variant.name, seed): pool.submit(run, variant.fixed | chosen[variant.name], seed,
                                                           best[variant.name][1] / f"seed{seed}")
                         for variant in VARIANTS for seed in other_seeds}
            runs = []
            for variant in VARIANTS:
                weights = variant.fixed | chosen[variant.name]
                runs.append({"variant": variant.name, "seed": grid_seed, "weights": weights, **best[variant.name][0]})
                runs += [{"variant": variant.name, "seed": seed, "weights": weights,
                          **seed_runs[variant.name, seed].result()} for seed in other_seeds]
    finally:  # a failed run ends the ablation: queued runs never start
        pool.shutdown(cancel_futures=True)

    summary = {v.name: {key: interval([r["test"][key] for r in runs if r["variant"] == v.name])
                        for key, _ in METRICS} for v in VARIANTS}
    title = f"{Path(args.config).stem} ablation: test, mean ± 95% interval over seeds {args.seeds} (%)"
    table = Table(title=title)
    for column in ("variant", "weights (chosen on val)", *(label for _, label in METRICS)):
        table.add_column(column, justify="left" if column.startswith(("variant", "weights")) else "right")
    lines = ["| variant | weights | " + " | ".join(label for _, label in METRICS) + " |",
             "|---" * (len(METRICS) + 2) + "|"]
    for variant in VARIANTS:
        cells = ["-" if s["mean"] is None else f"{100 * s['mean']:.1f} ± {100 * s['ci95']:.1f}" for s in
                 (summary[variant.name][key] for key, _ in METRICS)]
        weights = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in chosen[variant.name].items()) or "-"
        table.add_row(variant.name, weights, *cells)
        lines.append(f"| {variant.name} | {weights} | " + " | ".join(cells) + " |")
    console.print(table)
    command = " ".join(["python", "benchmarks/ablation.py", *sys.argv[1:]])
    payload = {"command": command, "config": args.config, "seeds": args.seeds, "overrides": args.extra,
               "jobs": args.jobs,
               "variants": {v.name: {"fixed": v.fixed, "grid": v.grid} for v in VARIANTS}, "chosen": chosen,
               "minutes": round((time.perf_counter() - start) / 60, 1), "runs": runs, "summary": summary}
    args.out.mkdir(parents=True, exist_ok=True)
    for path in {args.out / "ablation.json", args.json or args.out / "ablation.json"}:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / "ablation.md").write_text("\n".join(lines) + "\n")
    console.print(f"Wrote {args.json or args.out / 'ablation.json'} and {args.out / 'ablation.md'}")


if __name__ == "__main__":
    main()
