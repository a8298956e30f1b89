"""Parse a data set's label files once per node; every later load maps the result.

An adapter's parse (iNat2018's 437,513-entry JSON: ~1.5 s and ~400 MB per process) is
written to one cache file: a JSON header (class names and ids, splits, the source
files' size, mtime_ns and inode, and their SHA-256 taken when writing) followed by the
splits' arrays (data/long_tailed_dataset.py PathTable bytes and offsets, int64 labels). A load
checks the sources' (size, mtime_ns, inode) against the header and maps the arrays
read-only (np.memmap): no parse, and the ranks of a node share one copy of the pages.

The 8 ranks of a node start at once: the first takes an exclusive fcntl.flock on the
cache's lock file and parses; the others block on the lock, then read what it wrote
(atomically, jrcl_fast/atomic.py: a rank never maps a half-written file, and a rebuild
replaces the file, so a running process keeps mapping the one it opened; a cache file
must never be edited in place, which would fault its readers). The cache
lives in data.root/.jrcl_fast_cache, or where data.root is read-only in
$JRCL_FAST_CACHE, else $XDG_CACHE_HOME/jrcl_fast, else ~/.cache/jrcl_fast.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

from jrcl_fast.atomic import atomic_write_bytes
from jrcl_fast.data.long_tailed_dataset import LongTailedDataset, PathTable, Split

MAGIC = b"JRCLMETA2\n"  # bump the digit when the layout changes: older files are then rebuilt
ALIGN = 64
_LENGTH = struct.Struct("<Q")


def cache_folders(root: Path) -> list[Path]:
    """Where a cache may live, in order of preference: beside the data, then the user's."""
    user = os.environ.get("JRCL_FAST_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                     "jrcl_fast")
    return [root / ".jrcl_fast_cache", Path(user) / "metadata"]


def cache_name(name: str, root: Path) -> str:
    """One cache file per data set and root: a rebuild replaces it, never piles up."""
    return f"{name}-{hashlib.sha256(str(root.absolute()).encode()).hexdigest()[:16]}.meta"


def source_stats(sources: list[Path]) -> list[dict]:
    """What says a source is unchanged, cheaply: no read of the file."""
    stats = []
    for path in sources:
        st = path.stat()
        stats.append({"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino})
    return stats


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _arrays(dataset: LongTailedDataset) -> dict[str, np.ndarray]:
    arrays = {}
    for name, split in dataset.splits().items():
        arrays[f"{name}.paths"] = np.asarray(split.paths.blob, dtype=np.uint8)
        arrays[f"{name}.offsets"] = np.asarray(split.paths.offsets, dtype=np.int64)
        arrays[f"{name}.labels"] = np.asarray(split.labels, dtype=np.int64)
    return arrays


def _header(dataset: LongTailedDataset, stats: list[dict], arrays: dict[str, np.ndarray]) -> dict:
    splits = {name: {"root": str(split.root), "source": split.source} for name, split in dataset.splits().items()}
    table, offset = {}, 0
    for key, array in arrays.items():
        table[key] = {"dtype": array.dtype.str, "offset": offset, "count": len(array)}
        offset += -(-array.nbytes // ALIGN) * ALIGN
    return {"sources": stats, "splits": splits, "arrays": table,
            "dataset": {"name": dataset.name, "class_names": dataset.class_names, "class_ids": dataset.class_ids,
                        "normal_classes": dataset.normal_classes, "shot_groups": dataset.shot_groups,
                        "extra_splits": list(dataset.extra_splits)}}


def write_cache(path: Path, dataset: LongTailedDataset, stats: list[dict]) -> None:
    """Atomically write `dataset` to `path`, with the sources' stats and content hashes."""
    stats = [{**s, "sha256": _sha256(Path(s["path"]))} for s in stats]
    arrays = _arrays(dataset)
    header = json.dumps(_header(dataset, stats, arrays)).encode()
    start = -(-(len(MAGIC) + _LENGTH.size + len(header)) // ALIGN) * ALIGN

    def write(f: BinaryIO) -> None:
        f.write(MAGIC + _LENGTH.pack(start) + header)
        for array in arrays.values():
            f.write(b"\0" * (-f.tell() % ALIGN))
            f.write(array.tobytes())

    atomic_write_bytes(path, write)


def _read_header(path: Path) -> dict | None:
    try:
        with path.open("rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                return None
            (start,) = _LENGTH.unpack(f.read(_LENGTH.size))
            header = json.loads(f.read(start - len(MAGIC) - _LENGTH.size).rstrip(b"\0"))
    except (OSError, ValueError, struct.error):
        return None  # no cache yet, or not one of ours: rebuilt
    header["start"] = start
    return header


def _unchanged(recorded: list[dict], stats: list[dict]) -> bool:
    keys = ("path", "size", "mtime_ns", "inode")
    return [[s[k] for k in keys] for s in recorded] == [[s[k] for k in keys] for s in stats]


def read_cache(path: Path, stats: list[dict]) -> LongTailedDataset | None:
    """The cached data set, its arrays mapped read-only; None when there is no cache or
    its sources have changed since."""
    header = _read_header(path)
    if header is None or not _unchanged(header["sources"], stats):
        return None
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    arrays = {}
    for key, where in header["arrays"].items():
        begin = header["start"] + where["offset"]
        dtype = np.dtype(where["dtype"])
        # Plain read-only ndarrays over the mapping (not np.memmap, which fancy indexing and
        # ufuncs would carry along into every result).
        arrays[key] = np.asarray(mapped[begin:begin + where["count"] * dtype.itemsize]).view(dtype)
    splits = {name: Split(Path(s["root"]), PathTable(arrays[f"{name}.paths"], arrays[f"{name}.offsets"]),
                          arrays[f"{name}.labels"], s["source"]) for name, s in header["splits"].items()}
    meta = header["dataset"]
    return LongTailedDataset(name=meta["name"], class_names=meta["class_names"], class_ids=meta["class_ids"],
                             train=splits.pop("train"), test=splits.pop("test"), val=splits.pop("val", None),
                             normal_classes=meta["normal_classes"], shot_groups=meta["shot_groups"],
                             extra_splits={name: splits[name] for name in meta["extra_splits"]})


@contextmanager
def node_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between the processes of a node (fcntl.flock on `path`)."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def load_cached(name: str, root: Path, sources: list[Path],
                parse: Callable[[], LongTailedDataset]) -> LongTailedDataset:
    """`parse()`'s data set, parsed once per node and cached (module docstring). Without
    its sources (parse then names what is missing) or a writable cache folder, it parses."""
    if not all(path.is_file() for path in sources):
        return parse()
    stats = source_stats(sources)
    paths = [folder / cache_name(name, root) for folder in cache_folders(root)]
    for path in paths:
        if (cached := read_cache(path, stats)) is not None:
            return cached
    path = next((p for p in paths if _writable(p.parent)), None)
    if path is None:
        return parse()
    with node_lock(path.with_name(path.name + ".lock")):
        cached = read_cache(path, stats)  # not None: another rank wrote it while this one waited
        if cached is None:
            dataset = parse()
            try:
                write_cache(path, dataset, stats)
            except OSError:
                return dataset  # a full disk costs this run the cache, not the run
            cached = read_cache(path, stats)
    return cached
