"""The progress display: a live rich bar on a terminal, plain lines in a log file."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from jrcl_fast.engine.records.sink import Record, RecordSink, RunInfo

PLAIN_PROGRESS_INTERVAL_S = 30.0  # between plain progress lines, besides one at each epoch's end


class PlainProgress:
    """The progress display when stdout is not a terminal (a log file, a cluster
    scheduler): a plain line every `interval_s` seconds and at the end of each epoch,
    with the progress bar's fields. Takes the rich Progress calls that ProgressSink makes."""

    def __init__(self, console: Console, steps_per_epoch: int, epochs: int,
                 interval_s: float = PLAIN_PROGRESS_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.console, self.steps_per_epoch, self.epochs = console, steps_per_epoch, epochs
        self.interval_s, self.clock = interval_s, clock

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def add_task(self, description: str, total: int, completed: int, **fields: float) -> int:
        self.total, self.completed, self.first = total, completed, completed
        self.start = self.last_line = self.clock()
        return 0

    def update(self, task: int, advance: int, epoch: int, ips: float, loss: str) -> None:
        self.completed += advance
        step = self.completed - (epoch - 1) * self.steps_per_epoch
        now = self.clock()
        if step < self.steps_per_epoch and now - self.last_line < self.interval_s:
            return
        self.last_line = now
        seconds_per_step = (now - self.start) / max(self.completed - self.first, 1)
        eta = datetime.timedelta(seconds=round(seconds_per_step * (self.total - self.completed)))
        self.console.print(f"epoch {epoch}/{self.epochs} step {step}/{self.steps_per_epoch} "
                           f"{ips:.0f} img/s loss {loss} ETA {eta}", markup=False, highlight=False)


def progress_display(console: Console, steps_per_epoch: int, epochs: int) -> Progress | PlainProgress:
    """A live bar on a terminal; plain lines at an interval otherwise."""
    if not console.is_terminal:
        return PlainProgress(console, steps_per_epoch, epochs)
    return Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[ips]:>6.0f} img/s"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


class ProgressSink(RecordSink):
    """Steps done, images/s and the latest loss read on the host, on `console` (which
    is quiet on every rank but 0)."""

    def __init__(self, console: Console):
        self.console = console
        self.shown_loss = "-"  # the latest loss read (every LOSS_READ_INTERVAL steps): "-" before the first

    def start(self, info: RunInfo) -> None:
        self.display = progress_display(self.console, info.steps_per_epoch, info.epochs)
        self.display.__enter__()
        self.task = self.display.add_task("train", total=info.steps_per_epoch * info.epochs,
                                          completed=info.steps_per_epoch * info.epochs_done,
                                          epoch=info.epochs_done + 1, ips=0.0, loss="-")

    def step_done(self, epoch: int, images_per_s: float) -> None:
        self.display.update(self.task, advance=1, epoch=epoch, ips=images_per_s, loss=self.shown_loss)

    def steps(self, records: list[Record]) -> None:
        self.shown_loss = f"{records[-1]['loss_total']:.4f}"

    def close(self) -> None:
        self.display.__exit__(None, None, None)
