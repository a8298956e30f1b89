"""Results for people: tables on screen that read at 10 and at 8,142 classes (within 80
columns), the full per-class table as JSON and CSV on disk, and a per-class plot."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from jrcl_fast.atomic import atomic_write_bytes
from jrcl_fast.data.class_groups import SHOT_GROUPS

ALL_CLASSES_UP_TO = 20  # up to this many classes the screen lists them all
EXTREMES_SHOWN = 10  # beyond it, the worst and the best this many
NAME_WIDTH = 28  # characters of a class name on screen (iNat names are binomials)
GROUP_COLOURS = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}
SMOOTHING = 25  # a group's running mean spans 1/25 of its classes (one class below 50)
PER_CLASS_FIELDS = ("class", "id", "name", "shot_group", "train_count", "test_count", "accuracy")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _pct_fine(value: float) -> str:
    """A percentage with two significant digits below 1%: 1/8,142 is 0.012, not 0.0."""
    percent = 100 * value
    return f"{percent:.1f}" if percent >= 1 or percent == 0 else f"{percent:.2g}"


def _group_of(results: dict[str, Any]) -> dict[int, str]:
    return {c: g for g in SHOT_GROUPS for c in results["shot_classes"][g]}


def _table(title: str) -> Table:
    """A borderless table at least as wide as its title, which therefore stays on one line."""
    return Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, title_justify="left", min_width=len(title))


def _overall_table(results: dict[str, Any], title: str) -> Table:
    columns = {"top-1": _pct(results["top1"]), "balanced acc": _pct(results["balanced_accuracy"]),
               "macro-F1": _pct(results["macro_f1"])}
    if results.get("normal_vs_abnormal_accuracy") is not None:
        columns["normal vs abnormal"] = _pct(results["normal_vs_abnormal_accuracy"])
    columns["majority (bal.)"] = _pct_fine(results["majority_baseline_balanced_accuracy"])
    table = _table(f"{title} (%), {results['num_test_images']:,} images")
    for column in columns:
        table.add_column(column, justify="right")
    table.add_row(*columns.values())
    return table


def _shot_table(results: dict[str, Any]) -> Table:
    rows = results["per_class"]
    table = _table("Shot groups (by training images per class)")
    table.add_column("group")
    for column in ("classes", "train images", "test images", "accuracy %"):
        table.add_column(column, justify="right")
    for group in SHOT_GROUPS:
        members = [rows[c] for c in results["shot_classes"][group]]
        counts = [r["train_count"] for r in members]
        span = "-" if not counts else f"{min(counts):,}" + (f"-{max(counts):,}" if max(counts) > min(counts) else "")
        table.add_row(group, f"{len(members):,}", span, f"{sum(r['test_count'] for r in members):,}",
                      _pct(results["shot_accuracy"][group]))
    return table


def extremes(rows: list[dict[str, Any]], n: int = EXTREMES_SHOWN) -> tuple[list[dict], list[dict]]:
    """The `n` worst and `n` best classes of those tested. Among equal accuracies the
    worst list takes the classes with the most training images (the surprising
    failures), the best list those with the fewest (the tail's successes)."""
    tested = [r for r in rows if r["accuracy"] is not None]
    worst = sorted(tested, key=lambda r: (r["accuracy"], -r["train_count"], r["class"]))[:n]
    best = sorted(tested, key=lambda r: (-r["accuracy"], r["train_count"], r["class"]))[:n]
    return worst, best


def _class_table(title: str, sections: list[list[dict[str, Any]]], group_of: dict[int, str]) -> Table:
    table = _table(title)
    table.add_column("id", justify="right")
    table.add_column("name", max_width=NAME_WIDTH, no_wrap=True, overflow="ellipsis")
    for column in ("group", "train", "test", "accuracy %"):
        table.add_column(column, justify="right")
    for k, section in enumerate(sections):
        for row in section:
            table.add_row(str(row["id"]), row["name"], group_of.get(row["class"], "-"), f"{row['train_count']:,}",
                          f"{row['test_count']:,}", _pct(row["accuracy"]), end_section=row is section[-1] and k == 0)
    return table


def _per_class_table(results: dict[str, Any]) -> Table:
    """Every class up to ALL_CLASSES_UP_TO, else the worst and the best."""
    rows, group_of = results["per_class"], _group_of(results)
    if len(rows) <= ALL_CLASSES_UP_TO:
        return _class_table("Per-class accuracy", [rows], group_of)
    worst, best = extremes(rows)
    tested = [r["accuracy"] for r in rows if r["accuracy"] is not None]
    low, high = worst[0]["accuracy"], best[0]["accuracy"]
    ties = f"all at {_pct(low)}%" if low == high else \
        f"{tested.count(low):,} at {_pct(low)}%, {tested.count(high):,} at {_pct(high)}%"
    return _class_table(f"The {len(worst)} worst and {len(best)} best of {len(rows):,} classes ({ties})",
                        [worst, best], group_of)


def print_results(results: dict[str, Any], console: Console, title: str, per_class: bool = True) -> None:
    """The overall figures, the shot groups and (per_class) the classes, each a table."""
    console.print(_overall_table(results, title))
    console.print(_shot_table(results))
    if per_class:
        console.print(_per_class_table(results))


def write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_bytes(path, lambda f: f.write(json.dumps(payload, indent=2).encode()))


def write_per_class_csv(results: dict[str, Any], path: Path) -> None:
    """One row per class: PER_CLASS_FIELDS, accuracy empty where the test split has none."""
    group_of = _group_of(results)
    text = io.StringIO()
    rows = csv.writer(text)
    rows.writerow(PER_CLASS_FIELDS)
    for r in results["per_class"]:
        rows.writerow((r["class"], r["id"], r["name"], group_of.get(r["class"], ""), r["train_count"],
                       r["test_count"], "" if r["accuracy"] is None else r["accuracy"]))
    atomic_write_bytes(path, lambda f: f.write(text.getvalue().encode()))


def running_mean(x: np.ndarray, y: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """y averaged over `window` neighbours in x order (fewer at the ends), then over the
    points that share an x (many classes have the same training count): one value per
    distinct x, in increasing x."""
    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order]
    sums = np.concatenate([[0.0], np.cumsum(ys)])
    half = window // 2
    lo = np.clip(np.arange(len(ys)) - half, 0, len(ys))
    hi = np.clip(np.arange(len(ys)) + window - half, 0, len(ys))
    distinct, which = np.unique(xs, return_inverse=True)
    return distinct, np.bincount(which, (sums[hi] - sums[lo]) / (hi - lo)) / np.bincount(which)


def plot_per_class(results: dict[str, Any], path: Path, title: str) -> None:
    """Per-class accuracy against training count (log x), one colour per shot group,
    with each group's running mean. At thousands of classes the points are small,
    translucent and jittered (a few test images per class give a few accuracy levels),
    so that the running means carry the picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    group_of = _group_of(results)
    tested = [r for r in results["per_class"] if r["accuracy"] is not None]
    many = len(tested) > 200
    rng = np.random.default_rng(0)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for group in SHOT_GROUPS:
        rows = [r for r in tested if group_of.get(r["class"]) == group]
        if not rows:
            continue
        x = np.array([max(r["train_count"], 1) for r in rows], dtype=float)
        y = 100 * np.array([r["accuracy"] for r in rows])
        jitter = (rng.uniform(-0.04, 0.04, x.size), rng.uniform(-2.0, 2.0, y.size)) if many else (0.0, 0.0)
        ax.scatter(x * 10 ** jitter[0], y + jitter[1], color=GROUP_COLOURS[group], s=3 if many else 22,
                   alpha=0.15 if many else 0.8, linewidths=0)
        xs, mean = running_mean(x, y, max(1, len(rows) // SMOOTHING))
        classes = "1 class" if len(rows) == 1 else f"{len(rows):,} classes"
        ax.plot(xs, mean, color=GROUP_COLOURS[group], lw=2.2 if many else 1.2,
                label=f"{group}-shot: {classes}, mean {np.mean(y):.1f}%")
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log scale)" + (", points jittered" if many else ""))
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(-4, 104)
    lines = f"running mean over 1/{SMOOTHING} of a group's classes" if many else "join each group's classes"
    ax.set_title(f"{title}: {len(tested):,} classes", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False, fontsize=8,
              title=f"lines: {lines}", title_fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
