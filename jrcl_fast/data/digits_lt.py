"""digits-lt: scikit-learn's real 8x8 handwritten digits, made long-tailed.

Each class is split into train and test (stratified); the train split keeps
n_c = n_max * ratio^(-c / (C - 1)) images of class c, so class 0 is the head and
class 9 has n_max / ratio. The result is written once, deterministically from the
seed, as PNG files plus Places-LT style list files, so it goes through the same
reader as the real data sets.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from jrcl_fast.data.dataset import LongTailedDataset
from jrcl_fast.data.filelist import read_file_list, write_file_list


def long_tail_counts(n_max: int, num_classes: int, imbalance_ratio: float) -> list[int]:
    return [max(1, int(n_max * imbalance_ratio ** (-c / (num_classes - 1)))) for c in range(num_classes)]


def _write(folder: Path, imbalance_ratio: float, test_fraction: float, seed: int) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 16 grey levels -> 8 bit
    rng = np.random.default_rng(seed)
    num_classes = 10
    pools = []
    test = []
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(digits.target == c))
        n_test = int(round(len(idx) * test_fraction))
        test += [(int(i), c) for i in idx[:n_test]]
        pools.append(idx[n_test:])
    counts = long_tail_counts(min(len(p) for p in pools), num_classes, imbalance_ratio)
    train = [(int(i), c) for c in range(num_classes) for i in pools[c][: counts[c]]]
    for split, items in (("train", train), ("test", test)):
        (folder / split).mkdir(parents=True)
        paths = []
        for i, c in items:
            rel = f"{split}/{c}/{i:04d}.png"
            (folder / split / str(c)).mkdir(exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / rel)
            paths.append(rel)
        write_file_list(folder / f"{split}.txt", paths, [c for _, c in items])


def prepare_digits_lt(cache_root: str | Path, imbalance_ratio: float = 50.0, test_fraction: float = 0.3,
                      seed: int = 0) -> Path:
    """Write digits-lt under `cache_root` once and return its folder.

    The folder appears by an atomic rename, so a killed write never leaves half a
    data set behind for the next run to trust.
    """
    folder = Path(cache_root) / f"digits_lt_ir{imbalance_ratio:g}_test{test_fraction:g}_seed{seed}"
    if (folder / "test.txt").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".digits_lt_", dir=folder.parent))
    try:
        _write(staging, imbalance_ratio, test_fraction, seed)
        os.rename(staging, folder)
    except OSError:
        if not (folder / "test.txt").is_file():  # not a concurrent writer that won the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_digits_lt(cache_root: str | Path, imbalance_ratio: float, test_fraction: float,
                   seed: int) -> LongTailedDataset:
    folder = prepare_digits_lt(cache_root, imbalance_ratio, test_fraction, seed)
    return LongTailedDataset(
        name="digits_lt",
        class_names=[str(c) for c in range(10)],
        train=read_file_list(folder / "train.txt", folder),
        test=read_file_list(folder / "test.txt", folder),
    )
