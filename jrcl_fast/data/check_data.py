"""check-data: decode every image of a data set up front and list the bad ones.

The corrupt-image policy is to fail early and completely: rather than skipping or
substituting images mid-training (which silently changes the data and the epoch
length across ranks), the user runs this check once, fixes or removes what it lists,
and the loaders then treat any decode failure as an error.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from jrcl_fast.data.dataset import MISSING, LongTailedDataset
from jrcl_fast.data.images import ImageError, load_rgb


@dataclass(frozen=True)
class BadImage:
    split: str
    entry: int  # 1-based position in the split file
    path: str
    reason: str  # MISSING or "corrupt (why)"


@dataclass
class DataReport:
    dataset: str
    splits: list[str] = field(default_factory=list)
    checked: int = 0
    bad: list[BadImage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad

    @property
    def missing(self) -> int:
        return sum(b.reason == MISSING for b in self.bad)

    @property
    def corrupt(self) -> int:
        return len(self.bad) - self.missing

    def summary(self) -> str:
        return f"{self.checked - len(self.bad)} decoded, {self.missing} missing, {self.corrupt} corrupt"

    def lines(self) -> list[str]:
        head = f"{self.dataset} ({', '.join(self.splits)}): {self.checked} images, {self.summary()}"
        return [head] + [f"  {b.split} entry {b.entry}: {b.path}: {b.reason}" for b in self.bad]


def image_problem(path: Path) -> str | None:
    """None when PIL decodes the file (as the torchvision path does), else why not."""
    try:
        load_rgb(path)
    except ImageError as err:
        return err.problem
    return None


def check_data(dataset: LongTailedDataset, num_workers: int = 2) -> DataReport:
    """Decode every image of every split a config can read (PIL, as the torchvision path does)."""
    report = DataReport(dataset.name)
    with ThreadPoolExecutor(max(1, num_workers)) as pool:  # PIL decodes without the GIL
        for name, split in dataset.splits().items():
            problems = pool.map(image_problem, [split.root / p for p in split.paths], chunksize=64)
            for i, problem in enumerate(problems):
                if problem is not None:
                    report.bad.append(BadImage(name, i + 1, str(split.root / split.paths[i]), problem))
            report.checked += len(split)
            report.splits.append(name)
    return report
