"""Start-up you can see: each set-up phase of a run (metadata, files, model, loaders,
engine, kernels) as one line with its time, so a minute before step 1 is never silent.

On a terminal a spinner names the phase while it runs; every phase then prints one
line, in a log file too. Torch-free: the first line comes before torch is imported.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from rich.console import Console

NAME_WIDTH = 9  # the longest phase name, "metadata", and a space


@dataclass
class PhaseLine:
    """What a phase reports after its time; the phase's body sets `detail`."""

    detail: str = ""


@contextmanager
def phase(console: Console | None, name: str) -> Iterator[PhaseLine]:
    """Time the body and print `  name  1.2 s  detail` when it ends (nothing when it
    raises: the error speaks for itself; nothing either without a console, as when
    doctor builds the training stack)."""
    line = PhaseLine()
    start = time.perf_counter()
    if console is None:
        yield line
        return
    with console.status(f"{name} ...") if console.is_terminal else nullcontext():
        yield line
    console.print(f"  {name:<{NAME_WIDTH}}{time.perf_counter() - start:5.1f} s  {line.detail}",
                  highlight=False, markup=False)

