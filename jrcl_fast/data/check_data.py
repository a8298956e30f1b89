"""check-data: decode every image of a data set up front and list the bad ones.

The corrupt-image policy is to fail early and completely: rather than skipping or
substituting images mid-training (which silently changes the data and the epoch
length across ranks), the user runs this check once, fixes or removes what it lists,
and the loaders then treat any decode failure as an error.

Decoding runs in worker processes, one per available core (PIL holds the GIL for parts
of a decode, so threads would not scale), in chunks of files, each file once however
many splits list it. The same pass reads each file's header for the format census.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from jrcl_fast.atomic import atomic_write_bytes
from jrcl_fast.cores import available_cores
from jrcl_fast.data.augment import augmentation_for
from jrcl_fast.data.image_formats import CPU, FormatCensus, decode_placement, read_format
from jrcl_fast.data.images import ImageError, load_rgb
from jrcl_fast.data.long_tailed_dataset import MISSING, LongTailedDataset
from jrcl_fast.errors import UserError

FIRST_ENTRIES = 64  # all of the first entries missing: data.root is wrong, stop before decoding
BAD_SHOWN = 20  # bad files listed on screen; all of them go to the file
CHUNK = 256  # files per task: large enough that inter-process traffic is small beside decoding


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
    # Formats of the distinct files that could be read, by their headers.
    formats: FormatCensus = field(default_factory=lambda: FormatCensus(Counter(), Counter(), 0))

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
        return f"{self.checked - len(self.bad):,} decoded, {self.missing:,} missing, {self.corrupt:,} corrupt"

    def lines(self, bad_list: Path | None = None, shown: int = BAD_SHOWN) -> list[str]:
        """The summary, the first `shown` bad entries and, past those, where the rest are
        (`bad_list`, written by write_bad_list)."""
        head = f"{self.dataset} ({', '.join(self.splits)}): {self.checked:,} images, {self.summary()}"
        lines = [head] + [f"  {b.split} entry {b.entry}: {b.path}: {b.reason}" for b in self.bad[:shown]]
        if len(self.bad) > shown:
            lines.append(f"  ... and {len(self.bad) - shown:,} more")
        if self.bad and bad_list is not None:
            lines.append(f"all {len(self.bad):,} bad entries: {bad_list}")
        return lines

    def write_bad_list(self, path: Path) -> None:
        """Every bad entry as CSV (split, entry, path, problem), written atomically."""
        text = io.StringIO()
        rows = csv.writer(text)
        rows.writerow(("split", "entry", "path", "problem"))
        rows.writerows((b.split, b.entry, b.path, b.reason) for b in self.bad)
        atomic_write_bytes(path, lambda f: f.write(text.getvalue().encode()))


def image_problem(path: Path) -> str | None:
    """None when PIL decodes the file (as the torchvision path does), else why not."""
    try:
        load_rgb(path)
    except ImageError as err:
        return err.problem
    return None


# Per file: (problem or None, format label or None when unreadable, decoded on the CPU by a GPU run).
FileResult = tuple[str | None, str | None, bool]


def check_files(paths: list[str], gray_output: bool) -> list[FileResult]:
    """Decode and classify each file of a chunk (runs in a worker process)."""
    results = []
    for path in paths:
        problem = image_problem(Path(path))
        try:
            fmt = read_format(Path(path))
        except OSError:
            results.append((problem, None, False))
            continue
        results.append((problem, fmt.label, decode_placement(fmt, gray_output) == CPU))
    return results


def check_root(dataset: LongTailedDataset, first: int = FIRST_ENTRIES) -> None:
    """Stop in one sentence when the first `first` entries (in split order) are all
    missing: data.root, not the files, is wrong, and listing every entry helps nobody."""
    heads = [(split, rel) for split in dataset.splits().values() for rel in split.paths[:first]][:first]
    if any(os.path.exists(os.path.join(split.root, rel)) for split, rel in heads):
        return
    split, rel = heads[0]
    top = rel.lstrip("/").split("/")[0]
    raise UserError(f"none of the first {len(heads)} images exists (e.g. {os.path.join(split.root, rel)}, "
                    f"entry 1 of {split.source}): data.root is {split.root}; point it at the folder that holds "
                    f"{top}{'/' if top != rel else ''} (--set data.root=DIR)")


def _decode_progress(console: Console) -> Progress:
    return Progress(TextColumn("decoding"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]} images/s"), TextColumn("ETA"), TimeRemainingColumn(),
                    console=console)


def _run_chunks(chunks: list[list[str]], gray: bool, workers: int,
                advance: Callable[[int], None]) -> list[list[FileResult]]:
    """check_files over the chunks, in `workers` processes (inline for one), calling
    `advance(files)` as each chunk finishes."""
    done: list[list[FileResult]] = [[] for _ in chunks]
    if workers <= 1:
        for k, chunk in enumerate(chunks):
            done[k] = check_files(chunk, gray)
            advance(len(chunk))
        return done
    with ProcessPoolExecutor(workers) as pool:
        futures = {pool.submit(check_files, chunk, gray): k for k, chunk in enumerate(chunks)}
        for future in as_completed(futures):
            k = futures[future]
            done[k] = future.result()
            advance(len(chunks[k]))
    return done


def check_data(dataset: LongTailedDataset, workers: int | None = None, console: Console | None = None) -> DataReport:
    """Decode every image of every split a config can read (PIL, as the torchvision path
    does) in `workers` processes (default: the available cores), with a progress bar on
    `console`. Raises UserError when data.root is plainly wrong (check_root)."""
    check_root(dataset)
    splits = dataset.splits()
    unique = list(dict.fromkeys(os.path.join(s.root, rel) for s in splits.values() for rel in s.paths))
    chunks = [unique[i:i + CHUNK] for i in range(0, len(unique), CHUNK)]
    gray = augmentation_for(dataset.name).grayscale
    start = time.monotonic()
    with _decode_progress(console or Console(quiet=True)) as progress:
        task = progress.add_task("decode", total=len(unique), rate="-")

        def advance(n: int) -> None:
            done = progress.tasks[0].completed + n
            progress.update(task, advance=n, rate=f"{done / max(time.monotonic() - start, 1e-9):,.0f}")

        results = dict(zip(unique, (r for chunk in _run_chunks(chunks, gray, workers or available_cores(), advance)
                                    for r in chunk)))
    return _report(dataset, results)


def _report(dataset: LongTailedDataset, results: dict[str, FileResult]) -> DataReport:
    report = DataReport(dataset.name)
    for name, split in dataset.splits().items():
        for i, rel in enumerate(split.paths):
            path = os.path.join(split.root, rel)
            problem = results[path][0]
            if problem is not None:
                report.bad.append(BadImage(name, i + 1, path, problem))
        report.checked += len(split)
        report.splits.append(name)
    counts, cpu_counts = Counter(), Counter()
    for _, label, on_cpu in results.values():
        if label is not None:
            counts[label] += 1
            cpu_counts[label] += on_cpu
    report.formats = FormatCensus(counts, +cpu_counts, sum(counts.values()))
    return report
