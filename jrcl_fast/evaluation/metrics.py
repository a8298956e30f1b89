"""Long-tailed classification metrics from predictions."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from jrcl_fast.data.class_groups import SHOT_GROUPS


@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device) -> np.ndarray:
    """Predicted labels over an eval loader, in loader order."""
    model.eval()
    preds = [model(images.to(device, non_blocking=True)).logits.argmax(1).cpu() for images, _ in loader]
    return torch.cat(preds).numpy()


def classification_metrics(preds: np.ndarray, labels: np.ndarray, train_counts: np.ndarray,
                           groups: dict[str, list[int]], class_names: list[str],
                           class_ids: list[int] | None = None, normal_mask: np.ndarray | None = None) -> dict[str, Any]:
    """Top-1, balanced accuracy, macro-F1, shot-group and per-class accuracy, and with
    `normal_mask` (BDC's normal group G) the normal-vs-abnormal accuracy: whether the
    predicted class falls on the right side of G, averaged over the two sides (so that a
    dominant normal class does not carry it).

    Per-class rows name each class as the data set does: `id` is its own class id
    (iNaturalist category id; default the index), `class` the index that
    `shot_classes` lists.

    Balanced and group accuracies average per-class accuracy over classes present in
    the test split, so a head class counts once however many test images it has.
    """
    from sklearn.metrics import f1_score  # a second of start-up: imported when first needed

    num_classes = len(class_names)
    class_ids = list(range(num_classes)) if class_ids is None else class_ids
    test_counts = np.bincount(labels, minlength=num_classes)
    correct = np.bincount(labels, weights=(preds == labels), minlength=num_classes)
    present = test_counts > 0
    per_class = np.where(present, correct / np.maximum(test_counts, 1), np.nan)

    def mean_over(classes: list[int]) -> float | None:
        values = per_class[[c for c in classes if present[c]]]
        return float(values.mean()) if values.size else None

    normal_vs_abnormal = None
    if normal_mask is not None:
        truth, guess = normal_mask[labels], normal_mask[preds]
        normal_vs_abnormal = float(np.mean([(guess[truth == side] == side).mean()
                                            for side in (True, False) if (truth == side).any()]))
    return {
        "num_test_images": int(labels.size),
        "normal_vs_abnormal_accuracy": normal_vs_abnormal,
        "top1": float((preds == labels).mean()),
        "balanced_accuracy": mean_over(list(range(num_classes))),
        "macro_f1": float(f1_score(labels, preds, labels=np.flatnonzero(present), average="macro", zero_division=0)),
        "majority_baseline_balanced_accuracy": 1.0 / int(present.sum()),
        "shot_accuracy": {group: mean_over(groups[group]) for group in SHOT_GROUPS},
        "shot_classes": {group: [int(c) for c in groups[group]] for group in SHOT_GROUPS},
        "per_class": [
            {"class": c, "id": class_ids[c], "name": class_names[c], "train_count": int(train_counts[c]),
             "test_count": int(test_counts[c]), "accuracy": None if not present[c] else float(per_class[c])}
            for c in range(num_classes)
        ],
    }
