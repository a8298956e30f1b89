"""Machinery of the embedded data sets (digits-lt, mnist-lt, animal-lt): real images that ship
inside an installed package, made long-tailed and written once into a cache folder.

A data set is written deterministically from its seed as PNG files plus Places-LT
style list files (train.txt, test.txt and, where there is one, val.txt), so it goes
through the same reader as the real data sets.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from jrcl_fast.data.filelist import read_file_list, write_file_list
from jrcl_fast.data.long_tailed_dataset import LongTailedDataset
from jrcl_fast.errors import UserError

# The last list a write produces: its presence means the folder is complete.
COMPLETE_MARKER = "test.txt"


def long_tail_counts(n_max: int, num_classes: int, imbalance_ratio: float) -> list[int]:
    """Exponential profile n_c = n_max * ratio^(-c / (C - 1)), floored, at least 1."""
    return [max(1, int(n_max * imbalance_ratio ** (-c / (num_classes - 1)))) for c in range(num_classes)]


def normal_head_counts(pool: int, num_classes: int, imbalance_ratio: float, normal: int) -> list[int]:
    """Training images per class: the normal class first on the profile (its whole
    pool), then the other classes down the tail in class order."""
    order = [normal] + [c for c in range(num_classes) if c != normal]
    profile = long_tail_counts(pool, num_classes, imbalance_ratio)
    return [profile[order.index(c)] for c in range(num_classes)]


def held_out_splits(labels: np.ndarray, train_counts: list[int], val: int, test: int,
                    seed: int) -> dict[str, list[tuple[int, int]]]:
    """Per class, a seeded permutation of its images (label -1: excluded): the last `val`
    and `test` held out (balanced), the first train_counts[c] of the rest for training."""
    rng = np.random.default_rng(seed)
    splits: dict[str, list[tuple[int, int]]] = {"train": [], "val": [], "test": []}
    for c, count in enumerate(train_counts):
        idx = rng.permutation(np.flatnonzero(labels == c))
        pool = len(idx) - val - test
        if count > pool:
            raise UserError(f"data.imbalance_ratio is too low for this data set: class {c} has {len(idx)} images, "
                            f"too few for {count} train, {val} val and {test} test; raise it")
        splits["train"] += [(int(i), c) for i in idx[:count]]
        splits["val"] += [(int(i), c) for i in idx[pool:pool + val]]
        splits["test"] += [(int(i), c) for i in idx[pool + val:]]
    return splits


def write_once(folder: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(staging folder)` and rename the result to `folder`, unless `folder`
    is already complete. The folder appears by an atomic rename, so a killed write
    never leaves half a data set behind for the next run to trust."""
    if (folder / COMPLETE_MARKER).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}_", dir=folder.parent))
    try:
        write(staging)
        os.rename(staging, folder)
    except OSError:
        if not (folder / COMPLETE_MARKER).is_file():  # not a concurrent writer that won the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def write_splits(folder: Path, images: np.ndarray, splits: dict[str, list[tuple[int, int]]]) -> None:
    """Each split's (image index, label) pairs as `<split>/<label>/<index>.png` (8-bit
    grey, from `images`, N x H x W uint8) and a list file `<split>.txt`."""
    for split, items in splits.items():
        (folder / split).mkdir(parents=True)
        paths = []
        for i, c in items:
            rel = f"{split}/{c}/{i:04d}.png"
            (folder / split / str(c)).mkdir(exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / rel)
            paths.append(rel)
        write_file_list(folder / f"{split}.txt", paths, [c for _, c in items])


def read_written(name: str, folder: Path, class_names: list[str]) -> LongTailedDataset:
    """The data set `write_splits` wrote into `folder`."""
    val = folder / "val.txt"
    return LongTailedDataset(
        name=name,
        class_names=class_names,
        train=read_file_list(folder / "train.txt", folder),
        val=read_file_list(val, folder) if val.is_file() else None,
        test=read_file_list(folder / COMPLETE_MARKER, folder),
    )
