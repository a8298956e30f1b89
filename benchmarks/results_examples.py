"""The results screen and per-class plot at iNaturalist 2018's class count, from synthetic
predictions, to look at how they read (docs/results/).

The classes have the published training counts of jrcl_fast.data.fixtures (842 many,
4,076 medium, 3,224 few-shot) and 3 test images each, as iNat2018's val split; a test
image is classified right with a probability rising with log(training count). The
accuracies are made up: the layout is what is shown, not a model's result.

    python benchmarks/results_examples.py --out docs/results
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from rich.console import Console

from jrcl_fast.data.fixtures import INAT2018_TRAIN, class_counts
from jrcl_fast.evaluation.metrics import classification_metrics
from jrcl_fast.evaluation.report import plot_per_class, print_results

TEST_PER_CLASS = 3


def synthetic_results(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    counts = rng.permutation(class_counts(INAT2018_TRAIN))
    num_classes = len(counts)
    labels = np.repeat(np.arange(num_classes), TEST_PER_CLASS)
    hit = rng.random(labels.size) < np.clip(0.2 + 0.1 * np.log(counts), 0.0, 0.95)[labels]
    wrong = (labels + 1 + rng.integers(0, num_classes - 1, labels.size)) % num_classes
    groups = {"many": np.flatnonzero(counts > 100).tolist(),
              "medium": np.flatnonzero((counts >= 20) & (counts <= 100)).tolist(),
              "few": np.flatnonzero(counts < 20).tolist()}
    names = [f"Genus{c} species{c}" for c in range(num_classes)]
    return classification_metrics(np.where(hit, labels, wrong), labels, counts, groups, names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = synthetic_results()
    title = "iNat2018-shaped, synthetic accuracies"
    console = Console(width=80, record=True)
    print_results(results, console, title)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results_screen_8142_synthetic.txt").write_text(console.export_text())
    plot_per_class(results, args.out / "per_class_accuracy_8142_synthetic.png", title)


if __name__ == "__main__":
    main()
