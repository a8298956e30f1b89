"""The fair ablation: every variant with the same data, seeds, budget and selection rule,
its loss weights chosen on the validation split, the test split reported once.

1. Grid: each variant trains once per point of its small weight grid (seed 0), selecting
   the epoch on validation balanced accuracy; the point with the best validation score
   is that variant's weights.
2. Seeds: each variant trains with its chosen weights on every seed (the grid's seed-0
   run is reused). The test metrics of the selected epochs are reported as the mean
   and a 95% t-interval over seeds.

A second-stage variant (cRT) starts from the run of the variant it names in `after`
with the same seed (train.init_from): the first stage's chosen weights and seed. A variant
that names a `base` changes one term of it (JRCL without the binary head's CE): it runs at
the base's chosen weights with its own keys on top, so that the pair differs in that term
alone. The table of paired differences says, for each pair, in which settings its two
variants differ (the config's value where a variant sets none).

Each run is a plain `jrcl-fast train` with `--set` overrides, so the ablation measures
what a user runs; its output goes to train.log in its folder. A run's folder is named by
its variant, grid point, seed and a hash of all its overrides. One that holds
results.json is reused; one that holds a checkpoint resumes from its last epoch (with the
torch thread count it started with, so that it ends as if never stopped), and one whose
training finished without results.json is evaluated: an ablation stopped at any point
continues where it was when the same command is run again. A changed budget or variant
starts new runs rather than mixing old ones in (start from an empty --out and a new
ledger after changing the code). `--jobs N` runs N at a time, each with cpu_count // N
torch threads, each as soon as what it needs is done, the earliest variant of the study
first: a variant's other seeds start before a later variant's grid, so an ablation
stopped early holds whole variants, in the study's order. Writes JSON (one entry per
variant and seed) and Markdown, and prints two tables: each variant's test metrics, and
paired differences by seed, every variant against the best baseline (CE, logit-adjusted
CE, cRT; the best by validation mean) and the QUESTIONS of what one term adds (a question
that pairs a variant with that baseline is shown once, marked so where the baseline is
its b). `--variants` picks the study: mnist_lt (the default) or animal_lt (the issue-23
variants, with cRT). `--status` says where an ablation stands, from its --out folder, and
runs nothing; once a baseline is done on every seed, it also shows and writes
(partial.json and .md in --out; never at --json, which is the finished ablation's) both
tables for the variants done on every seed so far. `--curves PNG` with it plots the first
seed's validation curves, finished runs or not.

`--ledger PATH` keeps what the ablation has settled in a file to commit beside the report:
each finished run's record and each variant's weights once its grid chose them, for one
study (config, overrides, first seed). The machines here are replaced between sessions and
--out goes with them; a clone continues from the ledger, running only what it lacks (an
unfinished run on a lost machine starts over; a second stage needs its first stage's
checkpoint, which only the machine keeps).

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
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from machine import commit, cpu_machine
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from scipy import stats

from jrcl_fast.atomic import atomic_write_bytes
from jrcl_fast.checkpoint import CHECKPOINT_DIR, latest_tag, read_model_states, training_finished
from jrcl_fast.config import config_to_dict, load_config
from jrcl_fast.engine.records.metrics_files import METRICS_NAME, read_jsonl
from jrcl_fast.evaluation.evaluate import RESULTS_NAME


@dataclass(frozen=True)
class Variant:
    name: str
    fixed: dict[str, object]  # config keys every run of the variant sets
    grid: dict[str, list[object]] = field(default_factory=dict)  # weights chosen on validation
    after: str | None = None  # a second stage: starts from this variant's run of the same seed
    base: str | None = None  # one term changed in another variant: that variant's chosen weights, then `fixed`
    baseline: bool = False  # a published baseline: the best of them (on validation) is what the others must beat


# Without the contrastive term only the first view is trained on (config_checks' warning): such
# variants load one view, as a user runs them, instead of decoding and forwarding a second for nothing.
ONE_VIEW = {"data.num_views": 1}
NO_AUX = {"loss.lambda_con": 0, "loss.lambda_bin": 0, "loss.lambda_bdc": 0} | ONE_VIEW
CON = [0.1, 0.35]  # λ_con
LA = [0.5, 1.0]  # τ of logit adjustment (Menon et al. 2021 use 1.0)
# cRT (Kang et al., ICLR 2020): the classifier re-initialised and retrained alone on the CE
# run's frozen features, class-balanced sampling, CE only, 10 epochs as Kang et al. retrain,
# at the first stage's learning rate (animal_lt.yaml's), cosine, no warmup. On animal-lt its
# validation curve is flat from the first epoch (docs/RESULTS.md); a lower rate was not tried.
CRT = NO_AUX | {"train.trainable": "classifier", "data.sampler": "class_balanced", "train.epochs": 10,
                "optim.lr": 0.1, "optim.warmup_epochs": 0}
CE, LA_CE, SUPCON, O2A, CRT_NAME, LA_BDC = ("CE", "logit-adjusted CE", "CE + SupCon", "CE + O2A", "cRT",
                                            "logit-adjusted CE + BDC")
JRCL, JRCL_LA, JRCL_NO_BIN = "JRCL", "JRCL + logit adjustment", "JRCL, λ_bin = 0"
VARIANTS = {v.name: v for v in [
    Variant(CE, NO_AUX, baseline=True),
    Variant(LA_CE, NO_AUX, {"loss.logit_adjust_tau": LA}, baseline=True),
    Variant(SUPCON, {"loss.lambda_bin": 0, "loss.lambda_bdc": 0, "loss.use_prototypes": False,
                     "loss.class_average": False}, {"loss.lambda_con": CON}),
    Variant(O2A, {"loss.lambda_bin": 0, "loss.lambda_bdc": 0}, {"loss.lambda_con": CON}),
    Variant(CRT_NAME, CRT, after=CE, baseline=True),
    # BDC with its binary head on logit-adjusted CE, no contrastive term: what BDC adds to the strongest loss.
    Variant(LA_BDC, {"loss.lambda_con": 0} | ONE_VIEW, {"loss.logit_adjust_tau": LA}),
    Variant(JRCL, {}, {"loss.lambda_con": CON, "loss.lambda_bdc": [0.3, 1.0]}),
    Variant(JRCL_LA, {}, {"loss.logit_adjust_tau": LA}),
    # JRCL at its chosen weights less the binary head's CE: nothing but λ_bin differs, so the pair measures it
    Variant(JRCL_NO_BIN, {"loss.lambda_bin": 0}, base=JRCL),
]}
# The studies --variants picks, in the order they run and are shown; a second stage comes after
# the variant it starts from. animal-lt asks its main question first (what BDC adds to the
# strongest loss: logit-adjusted CE with and without it), then the other baselines, then the
# two-view variants, which cost twice as much a run.
STUDIES = {
    "mnist_lt": [CE, LA_CE, SUPCON, O2A, JRCL, JRCL_LA, JRCL_NO_BIN],
    "animal_lt": [LA_CE, LA_BDC, CE, CRT_NAME, O2A, JRCL, JRCL_LA, JRCL_NO_BIN],
}
# Paired questions (a - b, seed by seed) beside "every variant - the best baseline"; those
# whose variants are both in the study are asked.
QUESTIONS = [
    (LA_BDC, LA_CE, "BDC and its binary head, added to logit-adjusted CE"),
    (JRCL, O2A, "BDC and its binary head, added to CE + O2A"),
    (O2A, CE, "O2A, added to CE"),
    (JRCL_LA, JRCL, "logit adjustment, with the config's other weights against JRCL's chosen ones"),
    (JRCL, JRCL_NO_BIN, "the binary head's CE, inside JRCL"),
]
PAIRED = [("balanced_accuracy", "balanced acc"), ("normal_vs_abnormal_accuracy", "normal vs abnormal"),
          ("few", "few")]
METRICS = [("balanced_accuracy", "balanced acc"), ("many", "many"), ("medium", "medium"), ("few", "few"),
           ("normal_vs_abnormal_accuracy", "normal vs abnormal"), ("top1", "top-1")]


def grid_points(variant: Variant) -> list[dict[str, object]]:
    keys = list(variant.grid)
    return [dict(zip(keys, values)) for values in itertools.product(*variant.grid.values())]


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def run_command(config: str, settings: dict[str, object], extra: list[str], seed: int, out_dir: Path) -> list[str]:
    """The jrcl-fast command that brings the run in `out_dir` to results.json from where it is:
    evaluate a finished training, resume an unfinished one, or start it."""
    ckpt_dir = out_dir / CHECKPOINT_DIR
    saved = None
    if latest_tag(ckpt_dir):
        saved = read_model_states(ckpt_dir, "--out", fix=f"delete {out_dir} to run it again")
    if saved is not None and training_finished(saved):
        return [sys.executable, "-m", "jrcl_fast", "eval", "--checkpoint", str(ckpt_dir), "--output-dir", str(out_dir)]
    cmd = [sys.executable, "-m", "jrcl_fast", "train", "--config", config,
           "--resume" if saved is not None else "--overwrite",
           "--set", f"train.seed={seed}", "--set", f"train.output_dir={out_dir}",
           "--set", "train.select_on=val_balanced_accuracy"]
    for assignment in extra:
        cmd += ["--set", assignment]
    # after --set of yours: a variant's keys always hold (cRT's epochs against a budget's train.epochs)
    for key, value in settings.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    if saved is not None:  # the thread count it started with: a resumed run must have the same config
        cmd += ["--set", f"train.threads={saved['config']['train']['threads']}"]
    return cmd


def train(config: str, settings: dict[str, object], extra: list[str], seed: int, out_dir: Path) -> dict:
    """One run, resumed or evaluated where an earlier ablation left it; returns its test
    metrics and its validation score. (A finished run never gets here: the ledger settles it.)"""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = run_command(config, settings, extra, seed, out_dir)
    with (out_dir / "train.log").open("a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    if done.returncode:
        tail = (out_dir / "train.log").read_text()[-2000:]
        sys.exit(f"{' '.join(cmd)} failed (its output: {out_dir / 'train.log'}):\n{tail}")
    return run_record(out_dir)


def run_record(run: Path) -> dict:
    """A finished run's test metrics and validation score, from its results.json."""
    results = json.loads((run / RESULTS_NAME).read_text())
    test = {key: results[key] for key in ("balanced_accuracy", "top1", "macro_f1", "normal_vs_abnormal_accuracy")}
    selection = results["selection"]
    return {"val": {"balanced_accuracy": selection["best_value"], "epoch": selection["best_epoch"]},
            "test": test | results["shot_accuracy"]}


class Ledger:
    """What an ablation has settled, by run folder (relative to --out): each finished run's
    record, and each variant's grid point once its grid chose it. Kept in `path` when given,
    rewritten atomically at each change, so that it outlives the machine that holds --out.
    One ledger serves one study: the config, overrides and first seed it was written with."""

    def __init__(self, path: Path | None, out: Path):
        self.path, self.out = path, out
        saved = json.loads(path.read_text()) if path is not None and path.exists() else {}
        self.study: dict | None = saved.get("study")
        self.chosen: dict[str, dict[str, object]] = saved.get("chosen", {})
        self.runs: dict[str, dict] = saved.get("runs", {})

    def claim(self, study: dict) -> None:
        """Serve `study`, or refuse if the ledger holds another's choices."""
        if self.study is not None and self.study != study:
            raise ValueError(f"{self.path} holds another study's runs ({self.study}, not {study}): run with the "
                             "arguments it was written with, or give this study its own --ledger")
        self.study = study

    def key(self, run: Path) -> str:
        return run.relative_to(self.out).as_posix()

    def has(self, run: Path) -> bool:
        return self.key(run) in self.runs or (run / RESULTS_NAME).exists()

    def record(self, run: Path) -> dict | None:
        """The run's record: the ledger's, else its results.json's, else None (not finished)."""
        if self.key(run) in self.runs:
            return self.runs[self.key(run)]
        return run_record(run) if (run / RESULTS_NAME).exists() else None

    def add(self, run: Path, record: dict) -> None:
        """Keep `record` as the run's (a record it already holds leaves the file untouched)."""
        if self.runs.get(self.key(run)) != record:
            self.runs[self.key(run)] = record
            self.save()

    def choose(self, variant: str, point: dict[str, object]) -> None:
        self.chosen[variant] = point
        self.save()

    def save(self) -> None:
        if self.path is not None:
            saved = {"study": self.study, "chosen": self.chosen, "runs": dict(sorted(self.runs.items()))}
            text = json.dumps(saved, indent=1) + "\n"
            atomic_write_bytes(self.path, lambda f: f.write(text.encode()))


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


def paired(runs: list[dict], a: str, b: str, why: str) -> dict:
    """a - b on each test metric of PAIRED, seed by seed (the seeds both have), with the
    mean and 95% t-interval of the differences."""
    test = {(r["variant"], r["seed"]): r["test"] for r in runs}
    seeds = sorted(seed for variant, seed in test if variant == a and (b, seed) in test)
    row: dict = {"a": a, "b": b, "why": why, "seeds": seeds}
    for key, _ in PAIRED:
        per_seed = [None if test[a, s][key] is None or test[b, s][key] is None else test[a, s][key] - test[b, s][key]
                    for s in seeds]
        row[key] = interval(per_seed) | {"per_seed": per_seed}
    return row


def comparisons(runs: list[dict], study: list[Variant]) -> dict:
    """Every variant against the best baseline, chosen by its mean validation balanced
    accuracy over the seeds (never the test split), then the QUESTIONS of the study."""
    val = {v.name: float(np.mean([r["val"]["balanced_accuracy"] for r in runs if r["variant"] == v.name]))
           for v in study if v.baseline}
    best = max(val, key=val.get)
    names = {v.name for v in study}
    asked = {(a, b): why + (" (the best baseline)" if b == best else "")
             for a, b, why in QUESTIONS if {a, b} <= names}
    # a pair that is also a question, either way round, is shown once: as the question
    rows = [paired(runs, v.name, best, f"against the best baseline, {best}") for v in study
            if v.name != best and not {(v.name, best), (best, v.name)} & asked.keys()]
    rows += [paired(runs, a, b, why) for (a, b), why in asked.items()]
    return {"baseline": best, "baseline_val_means": val, "rows": rows}


def differences(a: dict[str, object], b: dict[str, object], defaults: dict) -> str:
    """The settings in which two variants' runs differ, as "key a vs b" (the config's value,
    `defaults`, where a variant sets none): what a paired difference measures."""
    def value(weights: dict[str, object], key: str) -> object:
        section, name = key.split(".", 1)
        return weights[key] if key in weights else defaults[section][name]

    return ", ".join(f"{key.split('.')[-1]} {value(a, key)} vs {value(b, key)}" for key in dict.fromkeys([*a, *b])
                     if value(a, key) != value(b, key))


def run_state(folder: Path) -> str:
    """done, the epochs an unfinished run has recorded, or not started."""
    if (folder / RESULTS_NAME).exists():
        return "done"
    if (folder / METRICS_NAME).exists():
        return f"at epoch {len(read_jsonl(folder / METRICS_NAME))}"
    return "started" if folder.exists() else "not started"


def weights_text(point: dict[str, object]) -> str:
    """A grid point as the tables show it: lambda_con=0.1, lambda_bdc=0.3 (- for none)."""
    return ", ".join(f"{key.split('.')[-1]}={value}" for key, value in point.items()) or "-"


def points(value: dict[str, float | None], sign: str = "") -> str:
    """An interval of fractions as percentage points: 91.2 ± 1.3 (- where the metric is missing)."""
    if value["mean"] is None:
        return "-"
    return f"{100 * value['mean']:{sign}.1f} ± {100 * value['ci95']:.1f}"


def show_table(console: Console, title: str, columns: list[str], rows: list[list[str]],
               text_columns: int = 2) -> list[str]:
    """Print one table (its first `text_columns` left-aligned) and return it as Markdown."""
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i < text_columns else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    return ["| " + " | ".join(row) + " |" for row in [columns, ["---"] * len(columns), *rows]]


def plot_curves(standing: list[dict], path: Path) -> int:
    """Validation balanced accuracy against epoch of every first-seed run that `Study.status()`
    found (finished or not), one line per grid point, a panel per variant: the curves that
    say whether the epochs are enough. Returns the number of runs drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(row["variant"], runs) for row in standing
              if (runs := [(point, read_jsonl(run / METRICS_NAME)) for point, run in row["grid_runs"]
                           if (run / METRICS_NAME).exists()])]
    if not panels:
        return 0
    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), sharex=True, sharey=True,
                                squeeze=False)
    for ax, (name, runs) in zip(axes[0], panels):
        for point, rows in runs:
            ax.plot([r["epoch"] for r in rows], [100 * r["val_balanced_accuracy"] for r in rows],
                    label=weights_text(point), linewidth=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if any(point for point, _ in runs):  # a variant without a grid needs no legend
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"validation balanced accuracy, seed {standing[0]['first_seed']} (%)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return sum(len(runs) for _, runs in panels)


def print_status(console: Console, rows: list[dict], total: int) -> None:
    def states(values: list[str]) -> str:
        return ", ".join(f"{values.count(v)} {v}" for v in dict.fromkeys(values)) or "-"

    table = Table(title="where the ablation stands (a variant's other seeds start once its grid is done)")
    for column in ("variant", "grid on the first seed", "chosen weights", "other seeds"):
        table.add_column(column, overflow="fold")  # weights whole, even in 80 columns
    for row in rows:
        chosen = "-" if row["chosen"] is None else weights_text(row["chosen"]) if row["chosen"] else "no grid"
        table.add_row(row["variant"], states(row["grid"]), chosen, states(list(row["seeds"].values())))
    console.print(table)
    every = [state for row in rows for state in row["grid"] + list(row["seeds"].values())]
    needless = ""
    if "not needed" in every:
        needless = f", {every.count('not needed')} not needed (their grid was settled before)"
    console.print(f"{every.count('done')} of {total} runs done{needless}; the unfinished ones resume when the same "
                  "command runs without --status")


@dataclass(frozen=True)
class Task:
    """One run of a study: a grid point on the first seed, or (point None) the variant's
    chosen point on another seed."""
    order: tuple[int, int, int]  # the variant's place in the study, the seed's, the grid point's
    variant: Variant
    seed: int
    point: dict[str, object] | None


class Study:
    """The runs of one ablation: each variant's grid on the first seed, then its chosen
    weights on every other seed; a second stage's runs (cRT) each start from its first
    stage's chosen run of the same seed, so that seeds stay paired. What the ledger holds
    is not run again: its runs' records, and its variants' chosen weights (their grids)."""

    def __init__(self, args: argparse.Namespace, variants: list[Variant], ledger: Ledger | None = None):
        self.args, self.variants = args, variants
        self.ledger = ledger or Ledger(None, args.out)
        self.first_seed = args.seeds[0]
        self.ledger.claim({"config": args.config, "overrides": args.extra, "first_seed": self.first_seed})
        self.chosen: dict[str, dict[str, object]] = {}  # variant -> its grid point chosen on validation
        self.folders: dict[str, Path] = {}  # variant -> the chosen point's folder (one seed<S>/ per seed)
        self.results: dict[tuple[str, int], dict] = {}  # (variant, seed) -> the chosen point's run
        for variant in variants:  # in the study's order: a first stage's folder before its second stage's
            point = self.ledger.chosen.get(variant.name)
            if point is None or not self.bases_chosen(variant):
                continue
            if point not in grid_points(variant):
                raise ValueError(f"{self.ledger.path}: {variant.name}'s chosen weights {point} are not in its grid; "
                                 "delete its entry under \"chosen\" to choose again")
            self.chosen[variant.name], self.folders[variant.name] = point, self.folder(variant, point)

    def bases_chosen(self, variant: Variant) -> bool:
        """Its first stage's weights are chosen, and its base's: its folders follow from them."""
        return all(other is None or other in self.chosen for other in (variant.after, variant.base))

    def inherited(self, variant: Variant) -> dict[str, object]:
        """The settings a variant takes from its base: every key the base's runs set; none without a base."""
        return {} if variant.base is None else self.weights(VARIANTS[variant.base])

    def weights(self, variant: Variant) -> dict[str, object]:
        """Every key a variant's runs set, on all seeds: inherited, fixed, chosen."""
        return self.inherited(variant) | variant.fixed | self.chosen[variant.name]

    def chosen_weights(self, variant: Variant) -> dict[str, object]:
        """What validation chose for it: its grid point, and its base's (as the tables show it)."""
        base = {} if variant.base is None else self.chosen_weights(VARIANTS[variant.base])
        return base | self.chosen[variant.name]

    def folder(self, variant: Variant, point: dict[str, object]) -> Path:
        identity = [variant.fixed, point, self.args.config, self.args.extra]
        if variant.after:  # a new first stage gives a new second stage
            identity.append(self.folders[variant.after].relative_to(self.args.out).as_posix())
        if variant.base:  # and a new choice of the base's weights, new runs
            identity.append(self.inherited(variant))
        digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
        return self.args.out / slug(variant.name) / f"{slug(json.dumps(point)) or 'defaults'}-{digest}"

    def keep_best(self, name: str, points: list[tuple[dict[str, object], Path]],
                  score: Callable[[Path], float]) -> Path:
        """The grid point with the best validation `score` (the first of equal ones) becomes
        the variant's weights; returns its folder."""
        point, folder = max(points, key=lambda pair: score(pair[1]))
        self.chosen[name], self.folders[name] = point, folder
        return folder

    def state(self, run: Path) -> str:
        return "done" if self.ledger.has(run) else run_state(run)

    def tasks(self) -> list[Task]:
        """Each variant's grid on the first seed and its other seeds; a variant whose weights
        the ledger holds has every seed at them and no grid."""
        grid = [Task((i, 0, j), v, self.first_seed, point) for i, v in enumerate(self.variants)
                if v.name not in self.chosen for j, point in enumerate(grid_points(v))]
        return grid + [Task((i, k, 0), v, seed, None) for i, v in enumerate(self.variants)
                       for k, seed in enumerate(self.args.seeds) if k or v.name in self.chosen]

    def can_start(self, task: Task) -> bool:
        """Its variant's weights are chosen (a grid point needs none), its base's too, and its
        first stage's run of the same seed is done."""
        chosen = task.point is not None or task.variant.name in self.chosen
        return (chosen and self.bases_chosen(task.variant)
                and (task.variant.after is None or (task.variant.after, task.seed) in self.results))

    def settings(self, task: Task) -> tuple[dict[str, object], Path]:
        """The run's config keys and its folder."""
        variant = task.variant
        point = self.chosen[variant.name] if task.point is None else task.point
        folder = self.folders[variant.name] if task.point is None else self.folder(variant, point)
        settings = self.inherited(variant) | variant.fixed | point
        if variant.after:
            settings |= {"train.init_from": str(self.folders[variant.after] / f"seed{task.seed}" / CHECKPOINT_DIR)}
        return settings, folder / f"seed{task.seed}"

    def runs(self, run: Callable[[dict[str, object], int, Path], dict], jobs: int,
             settled: Callable[[], None] = lambda: None) -> list[dict]:
        """Every run's record, variant by variant, seed by seed, calling `settled` as each is
        done or found done. At most `jobs` run at once; a free slot takes the earliest (in the
        study's order) run that can start."""
        waiting, running, grids = self.tasks(), {}, {v.name: [] for v in self.variants}

        def keep(task: Task, folder: Path, result: dict) -> None:
            self.record(task, folder, result, grids[task.variant.name])
            settled()

        with ThreadPoolExecutor(jobs) as pool:
            try:
                while waiting or running:
                    ready = [(t, *self.settings(t)) for t in sorted(filter(self.can_start, waiting),
                                                                    key=lambda t: t.order)]
                    if found := [(t, folder) for t, _, folder in ready if self.ledger.has(folder)]:
                        for task, folder in found:  # finished before: recorded without a slot
                            waiting.remove(task)
                            keep(task, folder, self.ledger.record(folder))
                        continue  # what they finish may let others start
                    self.check_first_stages(ready)
                    for task, settings, folder in ready[:jobs - len(running)]:
                        waiting.remove(task)
                        running[pool.submit(run, settings, task.seed, folder)] = (task, folder)
                    if not running:  # nothing runs and nothing can start: a second stage without its first
                        raise ValueError(f"{', '.join(sorted({t.variant.name for t in waiting}))} cannot start: "
                                         "a second stage needs its first stage (Variant.after) in the study, "
                                         "and a variant its base (Variant.base)")
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        keep(*running.pop(future), future.result())
            finally:  # a failure starts no other run; those under way finish and are kept
                for future, (task, folder) in running.items():
                    if future.exception() is None:
                        keep(task, folder, future.result())
        return [{"variant": v.name, "seed": seed, "weights": self.weights(v), **self.results[v.name, seed]}
                for v in self.variants for seed in self.args.seeds]

    def check_first_stages(self, ready: list[tuple[Task, dict[str, object], Path]]) -> None:
        """A second stage starts from its first stage's checkpoint, which the ledger does not
        keep: refuse, naming every such first-stage run, before starting any run (of `ready`:
        tasks with their settings and folders) that needs one. A second stage with an epoch
        done needs it no more: it resumes from its own checkpoint."""
        lost = [self.ledger.key(self.folders[t.variant.after] / f"seed{t.seed}") for t, settings, folder in ready
                if t.variant.after and not latest_tag(folder / CHECKPOINT_DIR)
                and not Path(str(settings["train.init_from"])).exists()]
        if lost:
            raise ValueError(f"{', '.join(lost)} (in {self.args.out}) must be trained again: a second stage starts "
                             f"from their checkpoints, which are not on this machine; delete them under \"runs\" in "
                             f"{self.ledger.path or 'the ledger'} (or their results.json) to do so")

    def record(self, task: Task, folder: Path, result: dict, grid: list[tuple]) -> None:
        """Keep a finished run's result (in the ledger too); the last of a grid chooses the
        variant's weights."""
        self.ledger.add(folder, result)
        if task.point is None:
            self.results[task.variant.name, task.seed] = result
            return
        grid.append((task.order, task.point, folder.parent, result))
        if len(grid) < len(grid_points(task.variant)):
            return
        grid.sort(key=lambda entry: entry[0])  # a tie goes to the grid's first point
        by_folder = {point_folder: result for _, _, point_folder, result in grid}
        best = self.keep_best(task.variant.name, [(point, point_folder) for _, point, point_folder, _ in grid],
                              lambda f: by_folder[f]["val"]["balanced_accuracy"])
        self.ledger.choose(task.variant.name, self.chosen[task.variant.name])
        self.results[task.variant.name, task.seed] = by_folder[best]

    def status(self) -> list[dict]:
        """Each variant's runs so far, read from the ledger and --out without running anything:
        its grid on the first seed (the runs' folders and states), its chosen weights once that
        grid is done or the ledger holds them, and then the states of its other seeds."""
        rows = []
        for variant in self.variants:
            row = {"variant": variant.name, "first_seed": self.first_seed, "grid_runs": [], "grid": [],
                   "chosen": None, "seeds": {}}
            rows.append(row)
            if not self.bases_chosen(variant):
                continue  # its folders follow the first stage's or the base's choice
            points = [(point, self.folder(variant, point)) for point in grid_points(variant)]
            row["grid_runs"] = [(point, folder / f"seed{self.first_seed}") for point, folder in points]
            row["grid"] = [self.state(run) for _, run in row["grid_runs"]]
            if variant.name in self.chosen:  # chosen before (the ledger): the rest of its grid will not run
                row["grid"] = [state if state == "done" or point == self.chosen[variant.name] else "not needed"
                               for (point, _), state in zip(points, row["grid"])]
            elif row["grid"].count("done") < len(points):
                continue
            else:
                self.keep_best(variant.name, points, lambda f: self.ledger.record(
                    f / f"seed{self.first_seed}")["val"]["balanced_accuracy"])
            row["chosen"] = self.chosen[variant.name]
            row["seeds"] = {seed: self.state(self.folders[variant.name] / f"seed{seed}")
                            for seed in self.args.seeds[1:]}
        return rows

    def finished_runs(self, standing: list[dict]) -> list[dict]:
        """The records of the variants that `status()` found done on every seed, as runs() returns them."""
        done = [v for v, row in zip(self.variants, standing) if row["chosen"] is not None
                and self.state(self.folders[v.name] / f"seed{self.first_seed}") == "done"
                and set(row["seeds"].values()) <= {"done"}]
        return [{"variant": v.name, "seed": seed, "weights": self.weights(v),
                 **self.ledger.record(self.folders[v.name] / f"seed{seed}")} for v in done for seed in self.args.seeds]


def report(console: Console, args: argparse.Namespace, study: list[Variant], chosen: dict[str, dict],
           runs: list[dict]) -> tuple[dict, list[str]]:
    """Print the two tables of the variants that have runs (every variant, or those done on every
    seed so far) and return the JSON payload and the tables as Markdown."""
    shown = [v for v in study if any(r["variant"] == v.name for r in runs)]
    summary = {v.name: {key: interval([r["test"][key] for r in runs if r["variant"] == v.name])
                        for key, _ in METRICS} for v in shown}
    compared = comparisons(runs, shown)
    weights, defaults = {r["variant"]: r["weights"] for r in runs}, config_to_dict(load_config(args.config, args.extra))
    for row in compared["rows"]:
        row["differs"] = differences(weights[row["a"]], weights[row["b"]], defaults)
    scope = "" if len(shown) == len(study) else f"; so far {len(shown)} of {len(study)} variants, each on every seed"
    lines = show_table(console, f"{Path(args.config).stem} ablation: test, mean ± 95% interval over seeds "
                       f"{args.seeds} (%){scope}", ["variant", "weights (chosen on val)",
                                                    *(label for _, label in METRICS)],
                       [[v.name, weights_text(chosen[v.name]), *(points(summary[v.name][key]) for key, _ in METRICS)]
                        for v in shown])
    caption = f"Paired by seed, a - b in points; best baseline on validation: {compared['baseline']}{scope}"
    caption += "" if compared["rows"] else "; no pair to show yet"  # only the baseline is done
    console.print(caption)
    lines += ["", caption]
    if compared["rows"]:
        pair_rows = [[row["a"], row["b"], row["why"], row["differs"], *(points(row[key], "+") for key, _ in PAIRED)]
                     for row in compared["rows"]]
        lines += [""] + show_table(
            console, "paired differences on the test split, a - b, mean ± 95% interval over seeds (points)",
            ["a", "b", "why", "a vs b differ in", *(label for _, label in PAIRED)], pair_rows, text_columns=4)
    command = " ".join(["python", "benchmarks/ablation.py", *sys.argv[1:]])
    machine, reported_at = cpu_machine(), commit()
    console.print(f"{len(runs)} runs; reported on {machine} at commit {reported_at}")
    payload = {"command": command, "machine": machine, "commit": reported_at, "config": args.config,
               "seeds": args.seeds, "overrides": args.extra, "study": args.variants,
               "complete": len(shown) == len(study),
               "variants": {v.name: {"fixed": v.fixed, "grid": v.grid, "after": v.after, "base": v.base}
                            for v in shown},
               "chosen": {v.name: chosen[v.name] for v in shown}, "runs": runs, "summary": summary,
               "paired": compared}
    return payload, lines


def write_report(console: Console, args: argparse.Namespace, payload: dict, lines: list[str], name: str,
                 copy: Path | None) -> None:
    """NAME.json and NAME.md in --out, and the JSON at `copy` too."""
    args.out.mkdir(parents=True, exist_ok=True)
    for path in {args.out / f"{name}.json", copy or args.out / f"{name}.json"}:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    console.print(f"Wrote {copy or args.out / f'{name}.json'} and {args.out / f'{name}.md'}")


def chosen_weights(study: Study) -> dict[str, dict[str, object]]:
    """Each variant's weights chosen on validation (its base's too), for the variants chosen so far."""
    return {v.name: study.chosen_weights(v) for v in study.variants if v.name in study.chosen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist_lt.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=Path("runs/mnist_lt_ablation"))
    parser.add_argument("--json", type=Path, help="also write the JSON here (default: OUT/ablation.json)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time; each gets cpu_count // jobs torch threads")
    parser.add_argument("--variants", choices=list(STUDIES), default="mnist_lt",
                        help="the study: its list of variants (STUDIES)")
    parser.add_argument("--status", action="store_true",
                        help="print where the ablation in --out stands, and the tables of the variants done so far; "
                        "runs nothing")
    parser.add_argument("--curves", type=Path, metavar="PNG",
                        help="with --status: also plot the first seed's validation curves to PNG")
    parser.add_argument("--ledger", type=Path,
                        help="keep the finished runs' records and the chosen weights here (a file to commit), and "
                        "run only what it lacks: an ablation outlives the machine that holds --out")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run, e.g. to size the budget")
    args = parser.parse_args()

    console, start = Console(), time.perf_counter()
    extra = args.extra
    if args.jobs > 1:  # split the cores between the concurrent runs (a --set of yours wins)
        extra = [f"train.threads={max(1, (os.cpu_count() or 1) // args.jobs)}", *extra]
    study = [VARIANTS[name] for name in STUDIES[args.variants]]
    total = sum(len(grid_points(v)) for v in study) + len(study) * (len(args.seeds) - 1)
    if args.status:
        looked = Study(args, study, Ledger(args.ledger, args.out))
        standing = looked.status()
        print_status(console, standing, total)
        if args.curves:
            console.print(f"Wrote the validation curves of {plot_curves(standing, args.curves)} runs to {args.curves}")
        finished = looked.finished_runs(standing)
        if any(v.baseline for v in study if any(r["variant"] == v.name for r in finished)):
            payload, lines = report(console, args, study, chosen_weights(looked), finished)
            write_report(console, args, payload, lines, "partial", None)  # --json is the final report's
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    ablation = Study(args, study, Ledger(args.ledger, args.out))
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("ablation", total=len(ablation.tasks()))  # a grid settled before has no runs left
        runs = ablation.runs(lambda settings, seed, folder: train(args.config, settings, extra, seed, folder),
                             args.jobs, lambda: progress.advance(task))

    payload, lines = report(console, args, study, chosen_weights(ablation), runs)
    payload |= {"jobs": args.jobs, "minutes": round((time.perf_counter() - start) / 60, 1)}
    write_report(console, args, payload, lines, "ablation", args.json)


if __name__ == "__main__":
    main()
