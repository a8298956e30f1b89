"""Run records: everything a run reports while it trains, written through sinks
(sink.py: RecordSink). Always: metrics.jsonl and steps.jsonl (rank 0) and the progress
display; by train.loggers: TensorBoard events and metrics.csv (rank 0), or any sink
registered in LOGGERS."""

from __future__ import annotations

from rich.console import Console

from jrcl_fast.engine.records.metrics_files import MetricsFiles
from jrcl_fast.engine.records.progress import ProgressSink
from jrcl_fast.engine.records.sink import Record, RecordSink, RunInfo
from jrcl_fast.registry import LOGGERS

__all__ = ["MetricsFiles", "ProgressSink", "Record", "RecordSink", "Records", "RunInfo", "build_records"]


class Records(RecordSink):
    """All the sinks of a run, called as one. `with records.opened(info):` starts them
    and closes every started one at the end, after an error too."""

    def __init__(self, sinks: list[RecordSink]):
        self.sinks, self.started = sinks, []

    def opened(self, info: RunInfo) -> Records:
        self.start(info)
        return self

    def __enter__(self) -> Records:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, info: RunInfo) -> None:
        try:
            for sink in self.sinks:
                sink.start(info)
                self.started.append(sink)
        except BaseException:
            self.close()
            raise

    def step_done(self, epoch: int, images_per_s: float) -> None:
        for sink in self.sinks:
            sink.step_done(epoch, images_per_s)

    def steps(self, records: list[Record]) -> None:
        for sink in self.sinks:
            sink.steps(records)

    def epoch(self, record: Record) -> None:
        for sink in self.sinks:
            sink.epoch(record)

    def close(self) -> None:
        while self.started:
            self.started.pop().close()


def build_records(loggers: list[str], console: Console, is_main: bool) -> Records:
    """The run's sinks: the files and train.loggers on rank 0 only (`is_main`), the
    progress display on every rank (the console of ranks but 0 is quiet)."""
    files: list[RecordSink] = [MetricsFiles(), *(LOGGERS.get(name)() for name in loggers)] if is_main else []
    # Progress last: it starts after every file sink, so a sink that fails to start
    # leaves no live display behind.
    return Records([*files, ProgressSink(console)])
