"""From a DataConfig to a LongTailedDataset and its loaders: the data layer's entry point."""

from __future__ import annotations

from pathlib import Path

from jrcl_fast.config import DataConfig
from jrcl_fast.data.adapters import CXR_SPECS, load_cxr_lt, load_inat2018
from jrcl_fast.data.dataset import LongTailedDataset
from jrcl_fast.data.digits_lt import load_digits_lt
from jrcl_fast.data.filelist import read_file_list
from jrcl_fast.errors import UserError


def load_places_lt(root: Path) -> LongTailedDataset:
    train = read_file_list(root / "Places_LT_train.txt", root)
    num_classes = 365
    return LongTailedDataset(
        name="places_lt",
        class_names=[str(c) for c in range(num_classes)],
        train=train,
        val=read_file_list(root / "Places_LT_val.txt", root),
        test=read_file_list(root / "Places_LT_test.txt", root),
    )


def load_dataset(cfg: DataConfig) -> LongTailedDataset:
    root = Path(cfg.root).expanduser()
    if cfg.name == "digits_lt":
        return load_digits_lt(root, cfg.imbalance_ratio, cfg.test_fraction, cfg.split_seed)
    if not root.is_dir():
        raise UserError(f"data.root {root} is not a folder; point it at the {cfg.name} data set")
    if cfg.name == "places_lt":
        return load_places_lt(root)
    if cfg.name in CXR_SPECS:
        return load_cxr_lt(root, CXR_SPECS[cfg.name])
    if cfg.name == "inat2018":
        return load_inat2018(root)
    raise UserError(f"data.name {cfg.name}: this data set has no adapter yet")
