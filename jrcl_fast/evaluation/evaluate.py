"""Evaluate a model on a split and publish the results.

results.json holds the test split's metrics at the top level, the data set's further
published evaluation splits (CXR-LT's balanced test split, which the benchmark's
head/medium/tail accuracies come from) under `other_splits`, and, after training, how the
weights were chosen under `selection`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from jrcl_fast.config import Config
from jrcl_fast.data.class_groups import ClassGroups
from jrcl_fast.data.loaders import build_eval_loader
from jrcl_fast.data.long_tailed_dataset import LongTailedDataset
from jrcl_fast.data.sampling import eval_indices
from jrcl_fast.evaluation.metrics import classification_metrics, predict
from jrcl_fast.evaluation.report import plot_per_class, print_results, write_json, write_per_class_csv
from jrcl_fast.models import JRCLNet
from jrcl_fast.runtime import Ranks, gather_shards

RESULTS_NAME = "results.json"
PLOT_NAME = "per_class_accuracy.png"
PER_CLASS_NAME = "per_class.csv"


def evaluate(model: JRCLNet, dataset: LongTailedDataset, cfg: Config, device: torch.device,
             ranks: Ranks = Ranks(), split: str = "test", groups: ClassGroups | None = None) -> dict[str, Any]:
    """Metrics on one split (dataset.splits() names them). Under several ranks each
    evaluates its shard (sampling.eval_indices) and the predictions are gathered in sample
    order, so every image counts exactly once; every rank returns the same results. The
    files are not checked here: the trainer checks every split before step 1, and
    evaluate_for_report before it reports (validation runs every epoch). `groups`: the
    run's class groups (derived here when not given)."""
    groups = groups or ClassGroups(dataset, cfg.data)
    data = dataset.splits()[split]
    positions = [eval_indices(len(data), r, ranks.world_size) for r in range(ranks.world_size)]
    loader = build_eval_loader(data, dataset.name, cfg.data, cfg.eval.batch_size, ranks.rank, ranks.world_size)
    # Gathered in sample order, the predictions line up with the split's own labels.
    preds = gather_shards(predict(model, loader, device), positions)
    # Normal vs abnormal where a normal class is named (CXR-LT's No Finding, mnist-lt's
    # normal digit, data.normal_classes), not where G falls back to the many-shot classes.
    return classification_metrics(preds, data.labels, dataset.train_counts, groups.shots, dataset.class_names,
                                  dataset.class_ids, groups.normal_mask if groups.normal_named else None)


def evaluate_for_report(model: JRCLNet, dataset: LongTailedDataset, cfg: Config, device: torch.device,
                        ranks: Ranks = Ranks(), groups: ClassGroups | None = None) -> dict[str, Any]:
    """The test split's metrics, with every further published evaluation split's under
    `other_splits`. Every split's files (this rank's share) are checked first, so a
    missing image is named before any evaluation, not after the test split's."""
    dataset.check_files_exist(("test", *dataset.extra_splits), ranks.rank, ranks.world_size)
    groups = groups or ClassGroups(dataset, cfg.data)
    results = evaluate(model, dataset, cfg, device, ranks, groups=groups)
    if dataset.extra_splits:
        results["other_splits"] = {name: evaluate(model, dataset, cfg, device, ranks, name, groups)
                                   for name in dataset.extra_splits}
    return results


def publish(results: dict[str, Any], out_dir: Path, title: str, console: Console) -> None:
    print_results(results, console, f"{title}: test split")
    for name, other in results.get("other_splits", {}).items():
        print_results(other, console, f"{title}: {name} split", per_class=False)
    write_json(out_dir / RESULTS_NAME, results)
    write_per_class_csv(results, out_dir / PER_CLASS_NAME)
    plot_per_class(results, out_dir / PLOT_NAME, f"{title}: test split")
    console.print(f"Results in {out_dir}:", highlight=False, markup=False, soft_wrap=True)
    console.print(f"  {RESULTS_NAME}, {PER_CLASS_NAME}, {PLOT_NAME}", highlight=False)
