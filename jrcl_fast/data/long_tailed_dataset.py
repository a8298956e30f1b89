"""The common form every data set adapter produces: image paths, labels, class names."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import numpy as np

from jrcl_fast.data.sampling import eval_indices
from jrcl_fast.errors import UserError

MISSING = "missing"  # the problem of an image file that does not exist (else "corrupt (why)")


class PathTable(Sequence[str]):
    """A split's file paths as two arrays: their UTF-8 bytes end to end, and where each
    starts (n + 1 offsets). iNat2018's 437,513 training paths take 30 MB so (27 MB of
    bytes, 3 MB of offsets) against 51 MB as a list of str, and the arrays can be views of
    the node's metadata cache file
    (data/metadata_cache.py), whose pages the ranks of a node then share."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[-1] != len(blob):
            raise ValueError("a PathTable needs n + 1 offsets, the last one the length of the bytes")
        self.blob, self.offsets = blob, offsets

    @classmethod
    def from_strings(cls, paths: Iterable[str]) -> PathTable:
        encoded = [p.encode() for p in paths]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"entry {i} of {len(self)}")
        i %= len(self)
        return self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode()

    def __iter__(self) -> Iterator[str]:
        data, ends = self.blob.tobytes(), self.offsets.tolist()
        return (data[a:b].decode() for a, b in zip(ends[:-1], ends[1:]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(other) == len(self) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside, as a list

    def __repr__(self) -> str:
        return f"PathTable({len(self)} paths, {len(self.blob)} bytes)"


@dataclass(frozen=True)
class Split:
    """One split: image paths relative to `root`, with integer labels. Paths given as a
    list of str are stored as a PathTable."""

    root: Path
    paths: PathTable
    labels: np.ndarray  # int64, one per path
    source: str  # the file this split was read from, for error messages

    def __post_init__(self) -> None:
        if not isinstance(self.paths, PathTable):
            object.__setattr__(self, "paths", PathTable.from_strings(self.paths))

    def __len__(self) -> int:
        return len(self.paths)

    def bad_entry(self, i: int, problem: str, others: int = 0) -> UserError:
        """The one wording, on both loaders and before training, for the image of entry
        `i` (0-based) that is `problem`; `others` more entries have the same problem."""
        entries = "entries are" if others > 1 else "entry is"
        more = f" ({others} more {entries} {problem.split()[0]} too)" if others else ""
        fix = "fix the path or data.root" if problem == MISSING else "replace the file or remove its entry"
        return UserError(f"{self.source}: entry {i + 1} ({self.root / self.paths[i]}) is {problem}{more}; {fix}, "
                         "and run 'jrcl-fast check-data' to list every missing or corrupt image")

    def check_files_exist(self, entries: np.ndarray | None = None) -> None:
        """Fail before training, not at hour 9, when an image file of `entries` (default:
        all) is missing. Ranks each check their own share: on a shared file system a
        data set of 10^5 images checked by every rank of every node is 10^5 stats each."""
        indices = range(len(self.paths)) if entries is None else entries.tolist()
        root = str(self.root)  # os.path on strings: half the time of Path objects at 437,513 files
        missing = [i for i in indices if not os.path.isfile(os.path.join(root, self.paths[i]))]
        if missing:
            raise self.bad_entry(missing[0], MISSING, len(missing) - 1)


def require_files(root: Path, names: list[str], what: str) -> None:
    """Name every missing file of a data set's layout at once, not one per attempt."""
    missing = [name for name in names if not (root / name).is_file()]
    if missing:
        raise UserError(f"data.root {root} lacks {', '.join(missing)}; it must hold {what} "
                        "(README, Data sets, lists the layout of each data set)")


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
    # The data set's own id of each class (iNat category ids); None: the class index.
    class_ids: list[int] | None = None
    # Further published evaluation splits by name (CXR-LT balanced-test): checked, not trained on.
    extra_splits: dict[str, Split] = field(default_factory=dict)
    train_counts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        num_classes = len(self.class_names)
        if self.class_ids is None:
            object.__setattr__(self, "class_ids", list(range(num_classes)))
        for split in self.splits().values():
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

    def describe(self) -> str:
        """E.g. 'inat2018: 8,142 classes; 437,513 train, 24,426 test images'."""
        sizes = ", ".join(f"{len(split):,} {name}" for name, split in self.splits().items())
        return f"{self.name}: {self.num_classes:,} classes; {sizes} images"

    def splits(self) -> dict[str, Split]:
        """Every split a config can read, by name: what check-data decodes and what a
        run checks for missing files before its first step."""
        named = {"train": self.train, "val": self.val, "test": self.test, **self.extra_splits}
        return {name: split for name, split in named.items() if split is not None}

    def check_files_exist(self, names: Iterable[str], rank: int = 0, world_size: int = 1) -> None:
        """Fail early when an image file of the named splits is missing, checking this
        rank's share of each (sampling.eval_indices): the ranks together check every file
        once."""
        splits = self.splits()
        for name in names:
            splits[name].check_files_exist(eval_indices(len(splits[name]), rank, world_size))
