"""metrics.jsonl (one line per epoch) and steps.jsonl (one line per step) in
train.output_dir: the run's records as JSON lines, always written by rank 0."""

from __future__ import annotations

import json
from pathlib import Path

from jrcl_fast.atomic import atomic_write_bytes
from jrcl_fast.engine.records.sink import Record, RecordSink, RunInfo

METRICS_NAME = "metrics.jsonl"
STEPS_NAME = "steps.jsonl"


def read_jsonl(path: Path) -> list[Record]:
    """The records of a JSON-lines file, [] where there is none yet. A last line without its
    newline is a write that a kill cut short: it is left out (the epoch runs again on resume)."""
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    return [json.loads(line) for line in lines if line]


def trim_jsonl(path: Path, epochs_done: int) -> None:
    """Drop the lines of epochs after the checkpoint: they will be run again."""
    if not path.exists():
        return
    kept = [record for record in read_jsonl(path) if record["epoch"] <= epochs_done]
    atomic_write_bytes(path, lambda f: f.write("".join(json.dumps(record) + "\n" for record in kept).encode()))


def append_jsonl(path: Path, records: list[Record]) -> None:
    with path.open("a") as f:
        f.write("".join(json.dumps(record) + "\n" for record in records))
        f.flush()


class MetricsFiles(RecordSink):
    def start(self, info: RunInfo) -> None:
        self.metrics_path, self.steps_path = info.out_dir / METRICS_NAME, info.out_dir / STEPS_NAME
        for path in (self.metrics_path, self.steps_path):
            if info.epochs_done:
                trim_jsonl(path, info.epochs_done)
            else:
                path.unlink(missing_ok=True)

    def steps(self, records: list[Record]) -> None:
        append_jsonl(self.steps_path, records)

    def epoch(self, record: Record) -> None:
        append_jsonl(self.metrics_path, [record])
