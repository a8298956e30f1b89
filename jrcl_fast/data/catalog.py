"""From a DataConfig to a LongTailedDataset: the data layer's entry point.

Each data set is an entry of the DATASETS registry, registered by its module in
data/sets/: how to load it, which augmentation profile its images take and, where it
has one, its normal class (BDC's normal group G). Adding a data set is one module
there, plus its YAML in configs/ and its test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from jrcl_fast.config import DataConfig
from jrcl_fast.data.long_tailed_dataset import LongTailedDataset
from jrcl_fast.errors import UserError
from jrcl_fast.registry import DATASETS


@dataclass(frozen=True)
class DatasetEntry:
    # (data.root, the data config) -> the data set.
    load: Callable[[Path, DataConfig], LongTailedDataset]
    augmentation: str  # a key of data.augment.AUGMENTATIONS
    # Class names of the default normal group G; empty: the many-shot classes.
    normal_classes: tuple[str, ...] = ()
    # Built from an installed package into data.root, a cache folder that need not exist yet.
    embedded: bool = False


def load_dataset(cfg: DataConfig) -> LongTailedDataset:
    entry: DatasetEntry = DATASETS.get(cfg.name)
    root = Path(cfg.root).expanduser()
    if not entry.embedded and not root.is_dir():
        raise UserError(f"data.root {root} is not a folder; point it at the {cfg.name} data set")
    dataset = entry.load(root, cfg)
    if entry.normal_classes:
        normal = [dataset.class_names.index(name) for name in entry.normal_classes]
        dataset = dataclasses.replace(dataset, normal_classes=normal)
    return dataset
