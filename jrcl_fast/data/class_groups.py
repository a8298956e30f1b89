"""Class groups derived from a data set and its config: shot groups for evaluation
and the normal group G of the BDC loss."""

from __future__ import annotations

from functools import cached_property

import numpy as np

from jrcl_fast.config import DataConfig
from jrcl_fast.data.long_tailed_dataset import LongTailedDataset
from jrcl_fast.errors import UserError

SHOT_GROUPS = ("many", "medium", "few")


class ClassGroups:
    """The class groups of one data set under its config, each derived once, when first
    read: a run makes one and its objective and every evaluation (each epoch's
    validation, the test splits) read the same groups."""

    def __init__(self, dataset: LongTailedDataset, cfg: DataConfig):
        self.dataset, self.cfg = dataset, cfg

    @cached_property
    def shots(self) -> dict[str, list[int]]:
        return shot_groups(self.dataset, self.cfg)

    @cached_property
    def normal_mask(self) -> np.ndarray:
        return normal_class_mask(self.dataset, self.cfg, self.shots)

    @property
    def normal_named(self) -> bool:
        """Whether G names normal classes (data.normal_classes, or the data set's own,
        such as CXR-LT's No Finding), not the many-shot stand-in: evaluation reports
        normal vs abnormal only then."""
        return self.dataset.normal_classes is not None or self.cfg.normal_classes is not None


def shot_groups(dataset: LongTailedDataset, cfg: DataConfig) -> dict[str, list[int]]:
    """Many/medium/few-shot classes: the published lists where the data set has them
    (CXR-LT head/medium/tail), else by training count with the config's thresholds."""
    if dataset.shot_groups is not None:
        return dataset.shot_groups
    counts = dataset.train_counts
    return {
        "many": np.flatnonzero(counts > cfg.many_shot_min).tolist(),
        "medium": np.flatnonzero((counts >= cfg.few_shot_max) & (counts <= cfg.many_shot_min)).tolist(),
        "few": np.flatnonzero(counts < cfg.few_shot_max).tolist(),
    }


def normal_class_mask(dataset: LongTailedDataset, cfg: DataConfig,
                      shots: dict[str, list[int]] | None = None) -> np.ndarray:
    """Boolean mask of G over the classes: data.normal_classes by name, else the data
    set's normal class (No Finding), else the many-shot classes (of `shots` when given,
    shot_groups' otherwise)."""
    if cfg.normal_classes is not None:
        unknown = [name for name in cfg.normal_classes if name not in dataset.class_names]
        if unknown:
            raise UserError(f"data.normal_classes: {unknown[0]!r} is not a class of {dataset.name}; "
                            f"use names from its class list, e.g. {dataset.class_names[0]!r}")
        normal = [dataset.class_names.index(name) for name in cfg.normal_classes]
    elif dataset.normal_classes is not None:
        normal = dataset.normal_classes
    else:
        normal = (shots or shot_groups(dataset, cfg))["many"]
    mask = np.zeros(dataset.num_classes, dtype=bool)
    mask[normal] = True
    if mask.all() or not mask.any():
        raise UserError(f"data.normal_classes: the normal group of {dataset.name} has {int(mask.sum())} of "
                        f"{dataset.num_classes} classes; BDC needs at least one normal and one abnormal class, "
                        f"so {_normal_group_fix(dataset, cfg)}")
    return mask


def _normal_group_fix(dataset: LongTailedDataset, cfg: DataConfig) -> str:
    """Every key to set, with values that work on this data set's training counts."""
    by_name = f"set data.normal_classes (class names, e.g. [{dataset.class_names[0]!r}])"
    distinct = np.unique(dataset.train_counts)
    if cfg.normal_classes is not None or distinct.size < 2:
        return by_name  # equal counts: no threshold splits the classes
    # The median count as the threshold puts about the larger half of the classes in G;
    # below the largest count, so that G is not empty.
    many_shot_min = int(min(np.median(dataset.train_counts), distinct[-2]))
    return (f"{by_name}, or set data.many_shot_min below the largest training count ({int(distinct[-1])}) and "
            f"data.few_shot_max at most data.many_shot_min, e.g. --set data.many_shot_min={many_shot_min} "
            f"--set data.few_shot_max={min(cfg.few_shot_max, many_shot_min)}")
