"""train.loggers: [csv]: train.output_dir/metrics.csv, one table for spreadsheets and
pandas: a row per step (scope `step`, its loss terms) and a row per epoch (scope
`epoch`, at the step that ends it: learning rate, images/s, the epoch's mean loss terms,
the validation balanced accuracy when the run selects on it). A column first met later
(the epoch metrics, after the step rows) rewrites the file once with the wider header;
a resumed run drops the rows of the epochs it runs again."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from jrcl_fast.atomic import atomic_write_bytes
from jrcl_fast.engine.records.sink import Record, RecordSink, RunInfo
from jrcl_fast.registry import LOGGERS

CSV_NAME = "metrics.csv"


def _csv_bytes(fields: list[str], rows: list[dict[str, object]]) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the whole rows of `path` (a row cut short by a kill is left out)."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = [row for row in reader if None not in row.values() and None not in row]
        return list(reader.fieldnames or []), rows


class MetricsCsv(RecordSink):
    def start(self, info: RunInfo) -> None:
        self.path, self.info = info.out_dir / CSV_NAME, info
        self.fields: list[str] = []
        if not info.epochs_done:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            self.fields, rows = read_csv(self.path)
            self._rewrite([row for row in rows if int(row["epoch"]) <= info.epochs_done])

    def steps(self, records: list[Record]) -> None:
        self._write([{"scope": "step", **record} for record in records])

    def epoch(self, record: Record) -> None:
        self._write([{"scope": "epoch", "epoch": record["epoch"], "step": self.info.step_of(record["epoch"]),
                      **record}])

    def _write(self, rows: list[dict[str, object]]) -> None:
        new = [name for row in rows for name in row if name not in self.fields]
        if new:
            old = read_csv(self.path)[1] if self.path.exists() else []
            self.fields += list(dict.fromkeys(new))
            self._rewrite(old + rows)
            return
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.fields, lineterminator="\n").writerows(rows)

    def _rewrite(self, rows: list[dict[str, object]]) -> None:
        atomic_write_bytes(self.path, lambda f: f.write(_csv_bytes(self.fields, rows)))


LOGGERS.register("csv", MetricsCsv)
