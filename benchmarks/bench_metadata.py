"""Label-file metadata at the published sizes: load time and memory, side by side with a
bare json.load.

Writes iNat2018-shaped (437,513 train / 24,426 val entries, 8,142 classes) and
Places-LT-shaped (62,500 train images, 365 classes) split files with
jrcl_fast.data.fixtures, then measures, each in fresh processes:

- json.load of train2018.json alone (iNat; the yardstick of issue 21),
- the first load_dataset (parses, writes the node's cache: data/metadata_cache.py),
- a cached load_dataset (maps the cache),

per rank (one process) and per node (`--ranks` processes started at once, as the ranks
of a node do: the first load then parses once while the others wait). Memory is the
growth of the process's RSS after the load and a gc.collect(); "touched" is the growth
once every path has been read (as an epoch does), and PSS shares each mapped page among
the processes that map it, so the per-node PSS sum is what the node really holds.

    nice -n 5 python benchmarks/bench_metadata.py --json docs/results/metadata.json
    python benchmarks/bench_metadata.py --scale 0.05 --ranks 2     # seconds, for a look

Not a test: the figures depend on the machine; docs/BENCHMARKS.md records them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model
from rich.console import Console
from rich.table import Table

MB = 2**20
WORKER = "--worker"


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def pss_mb() -> float:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024


def worker(mode: str, name: str, root: str, start_at: float) -> None:
    """One rank: import what the load needs, wait for the common start, load, report JSON."""
    from jrcl_fast.config import DataConfig
    from jrcl_fast.data.catalog import load_dataset
    from jrcl_fast.registry import DATASETS

    DATASETS.get(name)  # the adapters' import is start-up, not load
    gc.collect()
    rss0, pss0 = rss_mb(), pss_mb()
    time.sleep(max(0.0, start_at - time.time()))
    begin = time.perf_counter()
    if mode == "json.load":
        with open(Path(root) / "train2018.json") as f:
            held = json.load(f)
    else:
        held = load_dataset(DataConfig(name=name, root=root))
    seconds = time.perf_counter() - begin
    gc.collect()
    rss1, pss1 = rss_mb(), pss_mb()
    if mode != "json.load":
        sum(len(split.paths[i]) for split in held.splits().values() for i in range(len(split)))
    gc.collect()
    print(json.dumps({"seconds": seconds, "rss_mb": rss1 - rss0, "pss_mb": pss1 - pss0,
                      "touched_rss_mb": rss_mb() - rss0, "touched_pss_mb": pss_mb() - pss0}))


def run_ranks(mode: str, name: str, root: Path, ranks: int) -> list[dict]:
    """`ranks` fresh processes loading at the same moment (after their imports)."""
    start_at = time.time() + 2.0 + 0.5 * ranks  # after every process has imported
    procs = [subprocess.Popen([sys.executable, __file__, WORKER, mode, name, str(root), str(start_at)],
                              stdout=subprocess.PIPE, text=True) for _ in range(ranks)]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"a {mode} worker failed (exit {proc.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def drop_cache(root: Path) -> None:
    from jrcl_fast.data.metadata_cache import cache_folders

    for folder in cache_folders(root):
        for path in folder.glob("*.meta*"):
            path.unlink()


def measure(name: str, root: Path, ranks: int, console: Console) -> list[dict]:
    modes = (["json.load"] if name == "inat2018" else []) + ["first load", "cached load"]
    rows = []
    for mode in modes:
        for count in (1, ranks):
            if mode == "first load":
                drop_cache(root)
            console.print(f"{name}: {mode}, {count} rank(s)", highlight=False)
            results = run_ranks(mode if mode == "json.load" else "load", name, root, count)
            rows.append({"data set": name, "mode": mode, "ranks": count,
                         "seconds_max": max(r["seconds"] for r in results),
                         "rss_mb_per_rank_max": max(r["rss_mb"] for r in results),
                         "touched_rss_mb_per_rank_max": max(r["touched_rss_mb"] for r in results),
                         "touched_pss_mb_node": sum(r["touched_pss_mb"] for r in results),
                         "per_rank": results})
    return rows


def table(rows: list[dict], json_seconds: float) -> Table:
    out = Table(title="Label-file metadata, fresh processes", caption=(
        "s: the slowest rank's load; x json: against one json.load of train2018.json; RSS: growth per rank "
        "after the load (gc'd), then once every path was read; PSS: the node's sum, paths read"))
    for column in ("data set", "load", "ranks", "s", "x json", "RSS MB", "read", "PSS node"):
        out.add_column(column, justify="left" if column in ("data set", "load") else "right", no_wrap=True)
    for r in rows:
        ratio = f"{r['seconds_max'] / json_seconds:.3f}" if r["ranks"] == 1 and r["data set"] == "inat2018" else ""
        out.add_row(r["data set"], r["mode"], str(r["ranks"]), f"{r['seconds_max']:.3f}", ratio,
                    f"{r['rss_mb_per_rank_max']:.1f}", f"{r['touched_rss_mb_per_rank_max']:.1f}",
                    f"{r['touched_pss_mb_node']:.1f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the published class counts")
    parser.add_argument("--ranks", type=int, default=8, help="processes per node")
    parser.add_argument("--folder", type=Path, help="where the split files go (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    from jrcl_fast.atomic import atomic_write_bytes
    from jrcl_fast.data.fixtures import write_inat2018, write_places_lt

    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp)
        os.environ["JRCL_FAST_CACHE"] = str(folder / "user-cache")  # never the user's own cache
        roots = {"inat2018": write_inat2018(folder / "inat2018", args.scale),
                 "places_lt": write_places_lt(folder / "places_lt", args.scale)}
        rows = [row for name, root in roots.items() for row in measure(name, root, args.ranks, console)]
        sizes = {name: {p.name: p.stat().st_size for p in root.iterdir() if p.is_file()}
                 for name, root in roots.items()}
    json_seconds = next(r["seconds_max"] for r in rows if r["mode"] == "json.load" and r["ranks"] == 1)
    console.print(table(rows, json_seconds))
    if args.json:
        payload = {"machine": f"{cpu_model()}, {os.cpu_count()} cores", "load_average": os.getloadavg(),
                   "python": platform.python_version(), "command": " ".join(["python", *sys.argv]),
                   "scale": args.scale, "file_bytes": sizes, "rows": rows}
        atomic_write_bytes(args.json, lambda f: f.write(json.dumps(payload, indent=1).encode()))


if __name__ == "__main__":
    if sys.argv[1:2] == [WORKER]:
        worker(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]))
    else:
        main()
