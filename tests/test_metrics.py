import re

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from test_data_adapters import CXR_DIR, NIH_CXR_LT, gradient

from jrcl_fast.config import Config, DataConfig, ModelConfig, parse_config
from jrcl_fast.data.catalog import load_dataset
from jrcl_fast.data.class_groups import normal_class_mask, shot_groups
from jrcl_fast.data.long_tailed_dataset import LongTailedDataset, Split
from jrcl_fast.errors import UserError
from jrcl_fast.evaluation.evaluate import evaluate
from jrcl_fast.evaluation.metrics import classification_metrics
from jrcl_fast.evaluation.report import print_results
from jrcl_fast.models import JRCLNet


def brute_metrics(preds, labels, groups, num_classes):
    acc = {}
    for c in range(num_classes):
        idx = [i for i in range(len(labels)) if labels[i] == c]
        if idx:
            acc[c] = sum(preds[i] == c for i in idx) / len(idx)
    f1s = []
    for c in acc:
        tp = sum(1 for p, y in zip(preds, labels) if p == c and y == c)
        fp = sum(1 for p, y in zip(preds, labels) if p == c and y != c)
        fn = sum(1 for p, y in zip(preds, labels) if p != c and y == c)
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    group_acc = {g: (np.mean([acc[c] for c in cs if c in acc]) if any(c in acc for c in cs) else None)
                 for g, cs in groups.items()}
    return sum(acc.values()) / len(acc), np.mean(f1s), group_acc


@pytest.mark.parametrize("trial", range(5))
def test_metrics_match_brute_force(trial):
    rng = np.random.default_rng()
    num_classes = int(rng.integers(2, 12))
    labels = rng.integers(0, num_classes, int(rng.integers(1, 200)))
    preds = np.where(rng.random(labels.size) < 0.6, labels, rng.integers(0, num_classes, labels.size))
    counts = rng.integers(0, 300, num_classes)
    groups = {"many": np.flatnonzero(counts > 100).tolist(), "medium": np.flatnonzero((counts >= 20) & (counts <= 100)).tolist(),
              "few": np.flatnonzero(counts < 20).tolist()}
    got = classification_metrics(preds, labels, counts, groups, [f"c{c}" for c in range(num_classes)])
    balanced, macro_f1, group_acc = brute_metrics(preds.tolist(), labels.tolist(), groups, num_classes)
    assert got["top1"] == pytest.approx(np.mean(preds == labels))
    assert got["balanced_accuracy"] == pytest.approx(balanced)
    assert got["macro_f1"] == pytest.approx(macro_f1)
    for g in groups:
        assert got["shot_accuracy"][g] == pytest.approx(group_acc[g]) if group_acc[g] is not None else got["shot_accuracy"][g] is None
    assert sum(r["test_count"] for r in got["per_class"]) == labels.size


def dataset_with_counts(counts, normal=None, published=None):
    labels = np.repeat(np.arange(len(counts)), counts)
    split = Split(root=None, paths=["x"] * labels.size, labels=labels, source="train.txt")
    test = Split(root=None, paths=["x"] * len(counts), labels=np.arange(len(counts)), source="test.txt")
    return LongTailedDataset("toy", [f"c{c}" for c in range(len(counts))], split, test,
                             normal_classes=normal, shot_groups=published)


def test_shot_groups_follow_thresholds_and_published_lists():
    data = dataset_with_counts([150, 101, 100, 20, 19, 1])
    cfg = DataConfig(name="digits_lt", root="x")
    assert shot_groups(data, cfg) == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}
    cfg = DataConfig(name="digits_lt", root="x", many_shot_min=50, few_shot_max=2)
    assert shot_groups(data, cfg) == {"many": [0, 1, 2], "medium": [3, 4], "few": [5]}
    published = {"many": [5], "medium": [0], "few": [1, 2, 3, 4]}
    assert shot_groups(dataset_with_counts([150, 101, 100, 20, 19, 1], published=published), cfg) == published


def test_normal_group_resolution():
    cfg = DataConfig(name="digits_lt", root="x")
    assert normal_class_mask(dataset_with_counts([150, 50, 5]), cfg).tolist() == [True, False, False]
    assert normal_class_mask(dataset_with_counts([150, 50, 5], normal=[2]), cfg).tolist() == [False, False, True]
    named = DataConfig(name="digits_lt", root="x", normal_classes=["c1"])
    assert normal_class_mask(dataset_with_counts([150, 50, 5], normal=[2]), named).tolist() == [False, True, False]
    with pytest.raises(UserError, match="'c9' is not a class"):
        normal_class_mask(dataset_with_counts([150, 50, 5]), DataConfig(name="digits_lt", root="x", normal_classes=["c9"]))
    with pytest.raises(UserError, match="has 0 of 3 classes"):
        normal_class_mask(dataset_with_counts([50, 50, 5]), cfg)


@pytest.mark.parametrize("trial", range(4))
def test_a_small_subset_gets_one_message_whose_overrides_work(trial):
    """An iNat/Places subset with few images per class: the default thresholds leave the
    normal group empty; the one message names every key, and its values then work."""
    rng = np.random.default_rng(trial)
    counts = rng.integers(1, 30, size=int(rng.integers(3, 12)))
    counts[0] = counts.max() + 1  # at least two distinct counts
    data = dataset_with_counts(counts.tolist())
    with pytest.raises(UserError) as caught:
        normal_class_mask(data, DataConfig(name="inat2018", root="x"))
    message = str(caught.value)
    assert "data.normal_classes" in message and "data.many_shot_min" in message and "data.few_shot_max" in message
    overrides = re.findall(r"--set (\S+)", message)
    assert [o.split("=")[0] for o in overrides] == ["data.many_shot_min", "data.few_shot_max"]
    cfg = parse_config({"data": {"name": "inat2018", "root": "x"}}, "subset.yaml", overrides).data
    mask = normal_class_mask(data, cfg)
    assert mask.any() and not mask.all()
    assert mask.tolist() == (counts > cfg.many_shot_min).tolist()


def test_equal_counts_point_to_normal_classes_only():
    with pytest.raises(UserError, match=r"so set data.normal_classes \(class names, e.g. \['c0'\]\)$"):
        normal_class_mask(dataset_with_counts([4, 4, 4]), DataConfig(name="places_lt", root="x"))


def test_normal_vs_abnormal_accuracy_averages_both_sides_of_the_normal_group():
    rng = np.random.default_rng()
    labels, preds = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    normal = np.array([True, False, False, True, False])
    got = classification_metrics(preds, labels, np.ones(5), {"many": [], "medium": [], "few": []},
                                 list("abcde"), normal_mask=normal)
    # brute force: recall of "normal" among normal images, of "abnormal" among the others
    normal_recall = np.mean([normal[p] for p, t in zip(preds, labels) if normal[t]])
    abnormal_recall = np.mean([not normal[p] for p, t in zip(preds, labels) if not normal[t]])
    assert got["normal_vs_abnormal_accuracy"] == pytest.approx((normal_recall + abnormal_recall) / 2)
    assert classification_metrics(preds, labels, np.ones(5), {"many": [], "medium": [], "few": []},
                                  list("abcde"))["normal_vs_abnormal_accuracy"] is None


def test_per_class_results_keep_the_data_sets_class_ids():
    labels = np.array([0, 1, 2, 2])
    got = classification_metrics(np.array([0, 2, 2, 2]), labels, np.array([5, 3, 1]),
                                 {"many": [0], "medium": [1], "few": [2]}, ["s2", "s7", "s40"], [2, 7, 40])
    assert [(r["class"], r["id"], r["name"]) for r in got["per_class"]] == [(0, 2, "s2"), (1, 7, "s7"), (2, 40, "s40")]
    console = Console(record=True, width=120)
    print_results(got, console, "toy")
    table = console.export_text()
    assert all(re.search(rf"^\s+{cid}\s+{name}\s", table, re.M) for cid, name in ((2, "s2"), (7, "s7"), (40, "s40"))), table


def test_inat_results_name_classes_by_category_id(tmp_path):
    from test_data_adapters import write_inat

    write_inat(tmp_path)
    cfg = Config(data=DataConfig(name="inat2018", root=str(tmp_path), image_size=16, many_shot_min=1, few_shot_max=1),
                 model=ModelConfig(backbone="resnet18", small_input_stem=True, projection_dim=8,
                                   projection_hidden_dim=8))
    dataset = load_dataset(cfg.data)
    results = evaluate(JRCLNet(cfg.model, dataset.num_classes), dataset, cfg, torch.device("cpu"))
    assert [(r["id"], r["name"]) for r in results["per_class"]] == [(2, "species 2"), (7, "species 7"),
                                                                   (40, "species 40")]



@pytest.mark.skipif(not CXR_DIR.is_dir(), reason=f"published CXR-LT CSVs not found at {CXR_DIR}")
def test_cxr_results_report_the_balanced_test_split_with_the_published_groups(tmp_path):
    from jrcl_fast.evaluation.evaluate import evaluate_for_report

    for split in ("train", "balanced-val", "test", "balanced-test"):  # every split: the 300 balanced-val rows
        NIH_CXR_LT.csv_path(tmp_path, split).symlink_to(NIH_CXR_LT.csv_path(CXR_DIR, "balanced-val"))
    cfg = Config(data=DataConfig(name="nih_cxr_lt", root=str(tmp_path), image_size=16),
                 model=ModelConfig(backbone="resnet18", small_input_stem=True, projection_dim=8,
                                   projection_hidden_dim=8))
    dataset = load_dataset(cfg.data)
    for rel in dataset.val.paths:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gradient(16, 16, 1), mode="L").save(tmp_path / rel)
    results = evaluate_for_report(JRCLNet(cfg.model, dataset.num_classes), dataset, cfg, torch.device("cpu"))
    (name,) = results["other_splits"]
    balanced = results["other_splits"][name]
    assert name == "balanced-test" and balanced["num_test_images"] == 300 == results["num_test_images"]
    assert [len(balanced["shot_classes"][g]) for g in ("many", "medium", "few")] == [7, 10, 3]
    assert all(balanced["shot_accuracy"][g] is not None for g in ("many", "medium", "few"))
    assert results["normal_vs_abnormal_accuracy"] is not None  # No Finding is named: reported


def test_a_runs_class_groups_are_derived_once_and_agree_with_the_functions(monkeypatch):
    """ClassGroups: the objective's G and every evaluation's groups come from one
    derivation per run (validation runs every epoch); the values are shot_groups' and
    normal_class_mask's, and G is only derived when read (no error for a data set whose
    many-shot stand-in is degenerate until someone needs it)."""
    from jrcl_fast.data import class_groups

    calls = []
    shots = class_groups.shot_groups
    monkeypatch.setattr(class_groups, "shot_groups", lambda *args: calls.append(1) or shots(*args))
    cfg = DataConfig(name="digits_lt", root="x", many_shot_min=100, few_shot_max=20)
    data = dataset_with_counts([150, 101, 100, 20, 19, 1])
    groups = class_groups.ClassGroups(data, cfg)
    for _ in range(3):
        assert groups.shots == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}
        assert groups.normal_mask.tolist() == [True, True, False, False, False, False]
    assert len(calls) == 1 and not groups.normal_named
    assert class_groups.ClassGroups(dataset_with_counts([150, 50, 5], normal=[2]), cfg).normal_named
    degenerate = class_groups.ClassGroups(dataset_with_counts([4, 4, 4]), cfg)
    assert degenerate.shots["few"] == [0, 1, 2]
    with pytest.raises(UserError, match="data.normal_classes: the normal group"):
        _ = degenerate.normal_mask
