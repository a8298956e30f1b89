"""What a benchmark's figures name: the machine that measured them and the commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cpu_machine() -> str:
    """The CPU model and the cores this process may use: "AMD EPYC, 2 cores"."""
    return f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores"


def commit() -> str:
    """The short hash of the repository's HEAD, "+changes" when the work tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
