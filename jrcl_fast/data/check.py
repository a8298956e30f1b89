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

from jrcl_fast.data.dataset import LongTailedDataset, Split
from jrcl_fast.data.images import load_rgb
from jrcl_fast.errors import UserError


@dataclass(frozen=True)
class BadImage:
    split: str
    entry: int  # 1-based position in the split file
    path: str
    reason: str


@dataclass
class DataReport:
    dataset: str
    checked: int = 0
    bad: list[BadImage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad

    def lines(self) -> list[str]:
        head = f"{self.dataset}: {self.checked} images decoded, {len(self.bad)} bad"
        return [head] + [f"  {b.split} entry {b.entry}: {b.path}: {b.reason}" for b in self.bad]


def image_problem(path: Path) -> str | None:
    """None when PIL decodes the file (as the torchvision path does), else why not."""
    try:
        load_rgb(path)
    except UserError as err:
        # load_rgb's message is for a training run; the report wants the bare cause.
        cause = err.__context__
        return "missing" if isinstance(cause, FileNotFoundError) else f"corrupt ({cause or err})"
    return None


def check_data(dataset: LongTailedDataset, num_workers: int = 2) -> DataReport:
    """Decode every image of every split (PIL, as the torchvision path does)."""
    report = DataReport(dataset.name)
    splits: dict[str, Split] = {"train": dataset.train, "val": dataset.val, "test": dataset.test}
    with ThreadPoolExecutor(max(1, num_workers)) as pool:  # PIL decodes without the GIL
        for name, split in splits.items():
            if split is None:
                continue
            problems = pool.map(image_problem, [split.root / p for p in split.paths], chunksize=64)
            for i, problem in enumerate(problems):
                if problem is not None:
                    report.bad.append(BadImage(name, i + 1, str(split.root / split.paths[i]), problem))
            report.checked += len(split)
    return report
