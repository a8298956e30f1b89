"""The common form every data set adapter produces: image paths, labels, class names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jrcl_fast.errors import UserError


@dataclass(frozen=True)
class Split:
    """One split: image paths relative to `root`, with integer labels."""

    root: Path
    paths: list[str]
    labels: np.ndarray  # int64, one per path
    source: str  # the file this split was read from, for error messages

    def __len__(self) -> int:
        return len(self.paths)

    def check_files_exist(self) -> None:
        """Fail before training, not at hour 9, when an image file is missing."""
        for i, rel in enumerate(self.paths):
            if not (self.root / rel).is_file():
                raise UserError(
                    f"{self.source}: entry {i + 1} names {self.root / rel}, which does not exist; "
                    "fix the path or the data root (data.root)"
                )


@dataclass(frozen=True)
class LongTailedDataset:
    name: str
    class_names: list[str]
    train: Split
    test: Split
    val: Split | None = None
    # Classes of the BDC normal group when the data set has a normal class (CXR: No Finding).
    normal_classes: list[int] | None = None
    # Published head/medium/tail class lists (CXR-LT); None: derive from training counts.
    shot_groups: dict[str, list[int]] | None = None
    train_counts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        num_classes = len(self.class_names)
        for split in (self.train, self.test, self.val):
            if split is None:
                continue
            if len(split) == 0:
                raise UserError(f"{split.source}: the split is empty; check the file and data.root")
            bad = np.flatnonzero((split.labels < 0) | (split.labels >= num_classes))
            if bad.size:
                raise UserError(
                    f"{split.source}: entry {bad[0] + 1} has label {split.labels[bad[0]]}, outside "
                    f"[0, {num_classes}) for the {num_classes} classes of {self.name}"
                )
        object.__setattr__(self, "train_counts", np.bincount(self.train.labels, minlength=num_classes))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
