"""Reader of Places-LT style list files: one `relative/path.ext label` per line."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from jrcl_fast.data.long_tailed_dataset import Split
from jrcl_fast.errors import UserError

PLACES_STYLE = re.compile(r"^/[a-z]/")


def read_file_list(list_file: str | Path, image_root: str | Path) -> Split:
    list_file = Path(list_file)
    if not list_file.is_file():
        raise UserError(f"list file {list_file} does not exist; check data.root")
    paths, labels = [], []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise UserError(f"{list_file} line {number}: expected 'relative/path label', got {line!r}")
        # Places365 lists write /a/abbey/... (a one-letter folder first), relative to the
        # root; any other absolute path is taken as it is.
        path = parts[0]
        paths.append(path[1:] if PLACES_STYLE.match(path) else path)
        labels.append(int(parts[1]))
    return Split(Path(image_root), paths, np.asarray(labels, dtype=np.int64), str(list_file))


def write_file_list(list_file: Path, paths: list[str], labels: list[int]) -> None:
    list_file.write_text("".join(f"{p} {int(y)}\n" for p, y in zip(paths, labels)))
