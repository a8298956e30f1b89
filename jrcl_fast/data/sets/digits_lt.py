"""digits-lt: scikit-learn's real 8x8 handwritten digits, made long-tailed.

Each class is split into train and test (stratified); the train split keeps
n_c = n_max * ratio^(-c / (C - 1)) images of class c, so class 0 is the head and
class 9 has n_max / ratio. Written once into the cache (data/embedded.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jrcl_fast.config import DataConfig
from jrcl_fast.data.catalog import DatasetEntry
from jrcl_fast.data.embedded import long_tail_counts, read_written, write_once, write_splits
from jrcl_fast.data.long_tailed_dataset import LongTailedDataset
from jrcl_fast.registry import DATASETS

NUM_CLASSES = 10


def _write(folder: Path, imbalance_ratio: float, test_fraction: float, seed: int) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 16 grey levels -> 8 bit
    rng = np.random.default_rng(seed)
    pools = []
    test = []
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(digits.target == c))
        n_test = int(round(len(idx) * test_fraction))
        test += [(int(i), c) for i in idx[:n_test]]
        pools.append(idx[n_test:])
    counts = long_tail_counts(min(len(p) for p in pools), NUM_CLASSES, imbalance_ratio)
    train = [(int(i), c) for c in range(NUM_CLASSES) for i in pools[c][: counts[c]]]
    write_splits(folder, images, {"train": train, "test": test})


def prepare_digits_lt(cache_root: str | Path, imbalance_ratio: float = 50.0, test_fraction: float = 0.3,
                      seed: int = 0) -> Path:
    """Write digits-lt under `cache_root` once and return its folder."""
    folder = Path(cache_root) / f"digits_lt_ir{imbalance_ratio:g}_test{test_fraction:g}_seed{seed}"
    return write_once(folder, lambda staging: _write(staging, imbalance_ratio, test_fraction, seed))


def load_digits_lt(cache_root: str | Path, imbalance_ratio: float, test_fraction: float,
                   seed: int) -> LongTailedDataset:
    folder = prepare_digits_lt(cache_root, imbalance_ratio, test_fraction, seed)
    return read_written("digits_lt", folder, [str(c) for c in range(NUM_CLASSES)])


def _load(root: Path, cfg: DataConfig) -> LongTailedDataset:
    return load_digits_lt(root, cfg.imbalance_ratio, cfg.test_fraction, cfg.split_seed)


DATASETS.register("digits_lt", DatasetEntry(_load, "digits", embedded=True))
