"""Results for people: a rich table on screen, JSON on disk, and a per-class plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from jrcl_fast.atomic import atomic_write_bytes
from jrcl_fast.data.class_groups import SHOT_GROUPS

PER_CLASS_ROWS_SHOWN = 40  # iNaturalist has 8,142 classes: the full list goes to the JSON


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def print_results(results: dict[str, Any], console: Console, title: str, per_class: bool = True) -> None:
    summary = Table(title=f"{title} (%)")
    for column in ("top-1", "balanced acc", "macro-F1", *SHOT_GROUPS, "majority (bal.)"):
        summary.add_column(column, justify="right")
    summary.add_row(
        _pct(results["top1"]), _pct(results["balanced_accuracy"]), _pct(results["macro_f1"]),
        *[_pct(results["shot_accuracy"][g]) for g in SHOT_GROUPS], _pct(results["majority_baseline_balanced_accuracy"]),
    )
    console.print(summary)
    if not per_class:
        return
    rows = results["per_class"]
    per_class = Table(title="Per-class accuracy (%)" + ("" if len(rows) <= PER_CLASS_ROWS_SHOWN else
                      f", first {PER_CLASS_ROWS_SHOWN} of {len(rows)} classes; all are in the JSON"))
    for column in ("id", "name", "train images", "test images", "accuracy"):
        per_class.add_column(column, justify="right")
    for row in rows[:PER_CLASS_ROWS_SHOWN]:
        per_class.add_row(str(row["id"]), row["name"], str(row["train_count"]), str(row["test_count"]),
                          _pct(row["accuracy"]))
    console.print(per_class)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_bytes(path, lambda f: f.write(json.dumps(payload, indent=2).encode()))


def plot_per_class(results: dict[str, Any], path: Path, title: str) -> None:
    """Per-class accuracy against training count, log x axis, coloured by shot group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    group_of = {c: g for g in SHOT_GROUPS for c in results["shot_classes"][g]}
    colours = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for group in SHOT_GROUPS:
        rows = [r for r in results["per_class"] if r["accuracy"] is not None and group_of.get(r["class"]) == group]
        ax.scatter([max(r["train_count"], 1) for r in rows], [100 * r["accuracy"] for r in rows],
                   c=colours[group], label=f"{group}-shot", s=18, alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
