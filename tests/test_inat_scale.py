"""End to end at iNaturalist 2018's class count: one epoch at C = 8,142 on a few generated
16 px JPEGs per class in the published layout (train2018.json / val2018.json, images
under train_val2018/), with the torch and DALI (CPU) loaders, through `jrcl-fast train`
as a user runs it, checking what a user reads: the start-up phases in order, a screen
within 80 columns, the worst and best classes, results.json and per_class.csv complete,
the plot written.

Runs once in CI (not in the lowest-torch pass of .ci/run): about a minute per loader on
2 cores.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import REPO
from PIL import Image

NUM_CLASSES = 8142  # iNaturalist 2018
SUPERCATEGORIES = ("Plantae", "Insecta", "Aves", "Reptilia", "Mammalia", "Fungi")
PHASES = ("imports", "metadata", "files", "loaders", "model", "engine", "kernels")
COLUMNS = 80
RESULT_LINES = 40  # the tables after training: overall, shot groups, 10 worst and 10 best


def write_inat_images(root: Path, rng: np.random.Generator) -> tuple[list[int], np.ndarray]:
    """train2018.json / val2018.json over NUM_CLASSES categories with shuffled,
    non-contiguous ids, 1-3 training images per class and 1 val image, each a 16 px
    JPEG in the class's colour. Returns (category ids in id order, training counts in
    that order)."""
    ids = sorted(rng.choice(3 * NUM_CLASSES, NUM_CLASSES, replace=False).tolist())
    categories = [{"id": c, "name": f"{SUPERCATEGORIES[c % 6]} species {c}", "supercategory": SUPERCATEGORIES[c % 6]}
                  for c in rng.permutation(ids).tolist()]  # the file's order is not the id order
    train_counts = rng.integers(1, 4, NUM_CLASSES)
    colours = rng.integers(0, 256, (NUM_CLASSES, 3))
    noise = rng.integers(-20, 21, (16, 16, 3))
    next_id = 0
    for name, counts in (("train2018.json", train_counts), ("val2018.json", np.ones(NUM_CLASSES, dtype=int))):
        images, annotations = [], []
        for k in rng.permutation(np.repeat(np.arange(NUM_CLASSES), counts)).tolist():
            rel = f"train_val2018/{SUPERCATEGORIES[ids[k] % 6]}/{ids[k]}/{next_id:06d}.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(colours[k] + np.roll(noise, next_id, axis=0), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / rel, quality=90)
            images.append({"id": next_id, "file_name": rel, "width": 16, "height": 16})
            annotations.append({"id": next_id, "image_id": next_id, "category_id": ids[k]})
            next_id += 1
        (root / name).write_text(json.dumps({"images": images, "annotations": annotations,
                                             "categories": categories}))
    return ids, train_counts


@pytest.fixture(scope="module")
def inat_root(tmp_path_factory) -> tuple[Path, list[int], np.ndarray]:
    root = tmp_path_factory.mktemp("inat")
    ids, counts = write_inat_images(root, np.random.default_rng())
    return root, ids, counts


def config(tmp_path: Path, data_root: Path, loader: str) -> Path:
    """configs/inat2018.yaml made small: 8 px crops of the 16 px files, ResNet-32, one
    epoch, shot groups at this data's scale (many: 3 images, medium: 2, few: 1)."""
    from jrcl_fast.config import resolve_paths

    raw = yaml.safe_load((REPO / "configs" / "inat2018.yaml").read_text())
    resolve_paths(raw, REPO / "configs")
    raw["data"].update(root=str(data_root), image_size=8, loader=loader, many_shot_min=2, few_shot_max=2)
    raw["model"].update(backbone="resnet32", projection_dim=16, projection_hidden_dim=32)
    raw["loss"]["backend"] = "torch"
    raw["optim"]["warmup_epochs"] = 0
    raw["train"].update(epochs=1, batch_size=512, threads=2, output_dir=str(tmp_path / "run"))
    raw["eval"]["batch_size"] = 1024
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_one_epoch_at_8142_classes_reads_on_an_80_column_screen(inat_root, tmp_path: Path, loader: str) -> None:
    if loader == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    data_root, ids, counts = inat_root
    env = {**os.environ, "COLUMNS": str(COLUMNS)}
    done = subprocess.run([sys.executable, "-m", "jrcl_fast", "train", "--config", str(config(tmp_path, data_root,
                                                                                               loader))],
                          capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    screen = done.stdout.splitlines()
    out_dir = tmp_path / "run"

    # start-up: the phases, each once, in order, before training
    starts = [next(k for k, line in enumerate(screen) if line.startswith(f"  {name} ")) for name in PHASES]
    assert starts == sorted(starts) and screen[0].startswith("Setting up "), screen[:10]
    assert re.search(rf"  loaders .* {loader}, \d+ workers per rank \(default: \d+ cores\)", done.stdout)
    training = next(k for k, line in enumerate(screen) if line.startswith("Training with"))
    assert starts[-1] < training < next(k for k, line in enumerate(screen) if line.startswith("epoch 1/1"))
    assert f"{NUM_CLASSES:,} classes; {counts.sum():,} train, {NUM_CLASSES:,} test images" in screen[starts[PHASES.index("metadata")]]

    # the screen after training: 80 columns, few lines, the worst and best classes
    wide = [line for line in screen if len(line) > COLUMNS and not line.startswith("Results in ")]
    assert not wide, wide
    results_at = next(k for k, line in enumerate(screen) if "inat2018: test split (%)" in line)
    assert len(screen) - results_at <= RESULT_LINES + 2, screen[results_at:]
    results = json.loads((out_dir / "results.json").read_text())
    rows = results["per_class"]
    assert [r["id"] for r in rows] == ids and [r["train_count"] for r in rows] == counts.tolist()
    assert all(r["test_count"] == 1 and r["accuracy"] in (0.0, 1.0) for r in rows)
    majority = re.search(r"^\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s*$", "\n".join(screen[results_at:]), re.M)
    assert majority and majority.group(1) == f"{100 / NUM_CLASSES:.2g}"  # 0.012, not 0.0
    listed = re.findall(r"^\s+(\d+)\s+\S+ species \d+\s+(many|medium|few)\s+(\d+)\s+1\s+(0\.0|100\.0)\s*$",
                        "\n".join(screen[results_at:]), re.M)
    assert len(listed) == 20, screen[results_at:]
    by_id = {r["id"]: r for r in rows}
    assert all(by_id[int(cid)]["train_count"] == int(train) for cid, _, train, _ in listed)
    assert [float(acc) for *_, acc in listed[:10]] == sorted(100 * r["accuracy"] for r in rows)[:10]
    assert [float(acc) for *_, acc in listed[10:]] == sorted((100 * r["accuracy"] for r in rows), reverse=True)[:10]
    groups = {"many": counts > 2, "medium": counts == 2, "few": counts < 2}
    assert all(groups[group][ids.index(int(cid))] for cid, group, *_ in listed)

    # the files: per-class CSV, plot
    with (out_dir / "per_class.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == NUM_CLASSES
    assert [(int(t["id"]), int(t["train_count"]), float(t["accuracy"])) for t in table] == \
        [(r["id"], r["train_count"], r["accuracy"]) for r in rows]
    with Image.open(out_dir / "per_class_accuracy.png") as plot:
        assert plot.format == "PNG" and plot.width >= 600


def test_results_screen_at_8142_classes_shows_the_worst_and_best_within_80_columns() -> None:
    """Accuracies that vary (one epoch of the run above leaves them all at 0): the
    published training counts, 3 test images per class, a hit rate rising with the count."""
    from rich.console import Console

    from jrcl_fast.data.fixtures import INAT2018_TRAIN, class_counts
    from jrcl_fast.evaluation.metrics import classification_metrics
    from jrcl_fast.evaluation.report import print_results

    rng = np.random.default_rng()
    counts = rng.permutation(class_counts(INAT2018_TRAIN))
    labels = np.repeat(np.arange(NUM_CLASSES), 3)
    hit = rng.random(labels.size) < np.clip(0.1 * np.log(counts), 0.05, 0.9)[labels]
    preds = np.where(hit, labels, (labels + 1 + rng.integers(0, NUM_CLASSES - 1, labels.size)) % NUM_CLASSES)
    groups = {"many": np.flatnonzero(counts > 100).tolist(), "medium": np.flatnonzero((counts >= 20) & (counts <= 100)),
              "few": np.flatnonzero(counts < 20).tolist()}
    groups["medium"] = groups["medium"].tolist()
    names = [f"Genus{c} species{c} with a long infraspecific name" for c in range(NUM_CLASSES)]
    results = classification_metrics(preds, labels, counts, groups, names, list(range(5, 5 + NUM_CLASSES)))
    console = Console(width=COLUMNS, record=True)
    print_results(results, console, "inat2018: test split")
    screen = console.export_text().splitlines()
    assert max(map(len, screen)) <= COLUMNS and len(screen) <= RESULT_LINES, screen
    assert re.search(r"^\s+([\d.]+\s+){3}0\.012\s*$", "\n".join(screen), re.M)  # 1/8,142 in %
    listed = re.findall(r"^\s+(\d+)\s+Genus\d+ species\d+.*?\s+(many|medium|few)\s+([\d,]+)\s+3\s+([\d.]+)\s*$",
                        "\n".join(screen), re.M)
    assert len(listed) == 20, screen
    # independent of the report: accuracy per class from the predictions
    accuracy = np.bincount(labels, weights=preds == labels, minlength=NUM_CLASSES) / 3
    shown = [(int(cid) - 5, int(train.replace(",", "")), float(acc)) for cid, _, train, acc in listed]
    assert all(counts[c] == train and 100 * accuracy[c] == pytest.approx(acc, abs=0.05) for c, train, acc in shown)
    worst, best = shown[:10], shown[10:]
    assert all(acc == 100 * accuracy.min() for _, _, acc in worst)
    assert all(acc == 100 * accuracy.max() for _, _, acc in best)
    # among equals, the worst list takes the most-trained classes and the best the least-trained
    assert min(t for _, t, _ in worst) >= np.sort(counts[accuracy == accuracy.min()])[-10]
    assert max(t for _, t, _ in best) <= np.sort(counts[accuracy == accuracy.max()])[9]
    assert sum(k in " ".join(screen) for k in ("many", "medium", "few")) == 3
