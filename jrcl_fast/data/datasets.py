"""From a DataConfig to a LongTailedDataset: the data layer's entry point, which picks
the adapter of the named data set (adapters.py, digits_lt.py)."""

from __future__ import annotations

from pathlib import Path

from jrcl_fast.config import DataConfig
from jrcl_fast.data.adapters import CXR_SPECS, load_cxr_lt, load_inat2018, load_places_lt
from jrcl_fast.data.dataset import LongTailedDataset
from jrcl_fast.data.digits_lt import load_digits_lt
from jrcl_fast.errors import UserError


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
