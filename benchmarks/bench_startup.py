"""Start-up of `jrcl-fast train` as a user sees it on a terminal: seconds from launch to
the first line, to each set-up phase's line, and to the training progress bar.

Runs the command under a pseudo-terminal (so rich draws its spinner and live bar, as
for a user), timestamps its output, and stops it once the bar has drawn. Each run is a
fresh process; the first of `--runs` also pays a cold metadata cache and cold files.

    # iNat2018's published split sizes (437,513 / 24,426 entries, 8,142 classes), every
    # path a hard link to one 16 px JPEG, so the run gets as far as training:
    nice -n 5 python benchmarks/bench_startup.py --inat-full /tmp/inat_full --cold-metadata --runs 4 \
        --json docs/results/startup.json
    python benchmarks/bench_startup.py --config CONFIG [--set key=value ...]   # any config

Not a test: the figures depend on the machine; docs/BENCHMARKS.md records them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
PHASES = ("imports", "metadata", "files", "loaders", "model", "engine", "kernels")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BAR = re.compile(r"epoch 1\b.*img/s")  # the live bar's row (trainer.py's columns)


def link_images(root: Path) -> int:
    """A 16 px JPEG at every image path of root's iNat2018 split files, hard links to
    one file per folder (a file system caps the links of one file, ext4 at 65,000), so
    that a full-size fixture of jrcl_fast.data.fixtures gets images without their disk
    space. Returns the number of paths made."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, "JPEG")
    made = 0
    for name in ("train2018.json", "val2018.json"):
        for image in json.loads((root / name).read_text())["images"]:
            path = root / image["file_name"]
            if path.exists():
                continue
            source = path.parent / "first.jpg"
            if not source.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                source.write_bytes(buffer.getvalue())
            os.link(source, path)
            made += 1
    return made


def inat_full_config(root: Path) -> Path:
    """configs/inat2018.yaml on the fixture at `root`: the shipped model (ResNet-50 at
    224 px, 8,142 classes), CPU-sized only where start-up does not look (threads)."""
    from jrcl_fast.config import resolve_paths
    from jrcl_fast.data.fixtures import write_inat2018

    if not (root / "val2018.json").exists():
        write_inat2018(root)
    link_images(root)
    raw = yaml.safe_load((REPO / "configs" / "inat2018.yaml").read_text())
    resolve_paths(raw, REPO / "configs")
    raw["data"]["root"] = str(root)
    raw["train"]["output_dir"] = str(root / "run")
    path = root / "startup.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def drop_metadata_cache(config: Path, overrides: list[str]) -> None:
    """Remove the node cache of the config's label files (data/metadata_cache.py)."""
    from jrcl_fast.config import load_config
    from jrcl_fast.data.metadata_cache import cache_folders, cache_name

    data = load_config(str(config), overrides).data
    root = Path(data.root).expanduser()
    for folder in cache_folders(root):
        (folder / cache_name(data.name, root)).unlink(missing_ok=True)


def time_startup(command: list[str], limit_s: float = 600.0) -> dict[str, float | None]:
    """Seconds from launch to the first visible output, each phase's line, 'Training
    with' and the progress bar; the process is stopped once the bar has drawn."""
    main, child = pty.openpty()
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdin=child, stdout=child, stderr=child, cwd=REPO, start_new_session=True,
                            env={**os.environ, "COLUMNS": "100", "LINES": "40"})
    os.close(child)
    marks: dict[str, float | None] = dict.fromkeys(("first output", *PHASES, "training line", "progress bar"))
    text = ""
    try:
        while marks["progress bar"] is None and time.perf_counter() - start < limit_s:
            ready, _, _ = select.select([main], [], [], 0.05)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(main, 65536).decode(errors="replace")
            except OSError:  # the child closed the terminal
                break
            now = time.perf_counter() - start
            text += ANSI.sub("", chunk).replace("\r", "")
            found = {"first output": text.strip() != "", "training line": "Training with" in text,
                     "progress bar": BAR.search(text) is not None,
                     **{name: re.search(rf"^  {name} +\d", text, re.M) is not None for name in PHASES}}
            for name, seen in found.items():
                if seen and marks[name] is None:
                    marks[name] = round(now, 2)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        os.close(main)
    if marks["progress bar"] is None:
        raise SystemExit(f"no progress bar within {limit_s:.0f} s; the output was:\n{text[-3000:]}")
    return marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--inat-full", type=Path, help="folder for the full-size iNat2018 fixture (made if absent)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cold-metadata", action="store_true",
                        help="delete the data set's metadata cache before the first run (it parses the label files)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if (args.config is None) == (args.inat_full is None):
        parser.error("give --config or --inat-full")
    config = args.config or inat_full_config(args.inat_full)
    command = [sys.executable, "-m", "jrcl_fast", "train", "--config", str(config), "--overwrite",
               *[f"--set={o}" for o in args.overrides]]
    runs = []
    for k in range(args.runs):
        if k == 0 and args.cold_metadata:
            drop_metadata_cache(config, args.overrides)
        runs.append(time_startup(command))
    table = Table(title=f"jrcl-fast train start-up (s after launch), {platform.processor() or platform.machine()}")
    table.add_column("mark")
    for k in range(len(runs)):
        table.add_column(f"run {k + 1}", justify="right")
    for mark in runs[0]:
        table.add_row(mark, *["-" if run[mark] is None else f"{run[mark]:.2f}" for run in runs])
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "config": str(config),
                                         "overrides": args.overrides, "cpus": os.cpu_count(),
                                         "first_run_cold_metadata": args.cold_metadata, "runs": runs},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
