"""Run records as sinks: train.loggers' TensorBoard events and metrics.csv hold what
metrics.jsonl and steps.jsonl hold, a resumed run drops the records of the epochs it runs
again, only rank 0 writes, and a new sink is one registered class."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import tiny_config, train_until_killed
from rich.console import Console

from jrcl_fast.engine.records import MetricsFiles, ProgressSink, RecordSink, RunInfo, build_records
from jrcl_fast.engine.records.metrics_csv import CSV_NAME, MetricsCsv
from jrcl_fast.engine.records.tensorboard import TENSORBOARD_DIR, TensorBoardSink
from jrcl_fast.errors import UserError
from jrcl_fast.registry import LOGGERS


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the event files under `folder`, as TensorBoard shows it (events a
    restart purged left out): tag -> {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


class CallLog(RecordSink):
    """A third sink, registered by the test as a plug-in would be: it logs every call."""

    calls: list[tuple] = []

    def start(self, info: RunInfo) -> None:
        self.calls.append(("start", info.epochs_done, info.steps_per_epoch))

    def step_done(self, epoch: int, images_per_s: float) -> None:
        self.calls.append(("step_done", epoch))

    def steps(self, records: list[dict]) -> None:
        self.calls.append(("steps", [r["step"] for r in records]))

    def epoch(self, record: dict) -> None:
        self.calls.append(("epoch", record["epoch"]))

    def close(self) -> None:
        self.calls.append(("close",))


def test_a_run_with_tensorboard_and_csv_records_every_step_and_epoch(tmp_path, digits_root, monkeypatch):
    from jrcl_fast.config import load_config
    from jrcl_fast.data.catalog import load_dataset
    from jrcl_fast.engine import trainer

    monkeypatch.setitem(LOGGERS._entries, "call_log", CallLog)
    monkeypatch.setattr(CallLog, "calls", [])
    monkeypatch.setattr(trainer, "LOSS_READ_INTERVAL", 3)
    cfg = load_config(tiny_config(tmp_path, digits_root, train={"epochs": 2, "batch_size": 64, "threads": 1,
                                                                 "loggers": ["tensorboard", "csv", "call_log"]}))
    dataset = load_dataset(cfg.data)
    trainer.train(cfg, dataset, False, False, Console(quiet=True))

    run = tmp_path / "run"
    steps, epochs = read_jsonl(run / "steps.jsonl"), read_jsonl(run / "metrics.jsonl")
    per_epoch = len(dataset.train) // 64
    assert len(steps) == 2 * per_epoch and [e["epoch"] for e in epochs] == [1, 2]
    # metrics.csv: the step rows and the epoch rows, each with the values of the JSON lines
    rows = read_rows(run / CSV_NAME)
    step_rows = [r for r in rows if r["scope"] == "step"]
    epoch_rows = [r for r in rows if r["scope"] == "epoch"]
    assert [int(r["step"]) for r in step_rows] == [s["step"] for s in steps]
    assert [int(r["step"]) for r in epoch_rows] == [per_epoch, 2 * per_epoch]
    for row, want in [*zip(step_rows, steps), *zip(epoch_rows, epochs)]:
        assert {name: float(row[name]) for name in want} == pytest.approx({n: float(v) for n, v in want.items()})
    assert all(r["lr"] == "" for r in step_rows) and {"loss_total", "lr", "images_per_s"} <= set(rows[0])
    # TensorBoard: step/ scalars at every step, epoch/ scalars at the step that ends each epoch
    scalars = tensorboard_scalars(run / TENSORBOARD_DIR)
    assert scalars["step/loss_total"] == pytest.approx({s["step"]: s["loss_total"] for s in steps})
    assert scalars["epoch/lr"] == pytest.approx({per_epoch * e["epoch"]: e["lr"] for e in epochs})
    assert scalars["epoch/loss_ce"] == pytest.approx({per_epoch * e["epoch"]: e["loss_ce"] for e in epochs})
    # the sink contract's call order: start, per step step_done, per read steps, per epoch epoch, close
    calls = CallLog.calls
    assert calls[0] == ("start", 0, per_epoch) and calls[-1] == ("close",)
    assert [c for c in calls if c[0] == "epoch"] == [("epoch", 1), ("epoch", 2)]
    assert sum(c[0] == "step_done" for c in calls) == 2 * per_epoch
    read = [step for c in calls if c[0] == "steps" for step in c[1]]
    assert read == list(range(1, 2 * per_epoch + 1))
    assert all(len(c[1]) <= 3 for c in calls if c[0] == "steps")
    assert calls.index(("epoch", 1)) < calls.index(("steps", [per_epoch + 1, per_epoch + 2, per_epoch + 3]))


def feed(sinks: list[RecordSink], info: RunInfo, epochs: range, offset: float) -> None:
    """Records of `epochs` (1-based) as the loop sends them; values tell runs apart by `offset`."""
    for sink in sinks:
        sink.start(info)
    for epoch in epochs:
        for step in range((epoch - 1) * info.steps_per_epoch + 1, epoch * info.steps_per_epoch + 1):
            for sink in sinks:
                sink.steps([{"epoch": epoch, "step": step, "loss_total": offset + step}])
        for sink in sinks:
            sink.epoch({"epoch": epoch, "lr": offset + epoch, "images_per_s": 100.0, "loss_total": offset})
    for sink in sinks:
        sink.close()


def test_a_resumed_run_drops_the_records_of_the_epochs_it_runs_again(tmp_path):
    """Killed during epoch 3 after checkpoint 2: the records of epoch 3 written before the
    kill are dropped from every file, and TensorBoard hides their events."""
    info = RunInfo(tmp_path, epochs=3, steps_per_epoch=4, epochs_done=0, config={})
    sinks: list[RecordSink] = [MetricsFiles(), MetricsCsv(), TensorBoardSink()]
    feed(sinks, info, range(1, 4), offset=0.0)  # the first run wrote epochs 1-3 (3 not checkpointed)
    resumed = RunInfo(tmp_path, epochs=3, steps_per_epoch=4, epochs_done=2, config={})
    sinks = [MetricsFiles(), MetricsCsv(), TensorBoardSink()]
    feed(sinks, resumed, range(3, 4), offset=1000.0)

    steps = read_jsonl(tmp_path / "steps.jsonl")
    assert [(s["step"], s["loss_total"]) for s in steps] == [(n, n + (1000.0 if n > 8 else 0.0)) for n in range(1, 13)]
    assert [e["lr"] for e in read_jsonl(tmp_path / "metrics.jsonl")] == [1.0, 2.0, 1003.0]
    rows = read_rows(tmp_path / CSV_NAME)
    assert [(r["scope"], int(r["step"]), float(r["loss_total"])) for r in rows if r["scope"] == "step"] == [
        ("step", n, n + (1000.0 if n > 8 else 0.0)) for n in range(1, 13)]
    assert [float(r["lr"]) for r in rows if r["scope"] == "epoch"] == [1.0, 2.0, 1003.0]
    scalars = tensorboard_scalars(tmp_path / TENSORBOARD_DIR)
    assert scalars["step/loss_total"] == {n: n + (1000.0 if n > 8 else 0.0) for n in range(1, 13)}
    assert scalars["epoch/lr"] == {4: 1.0, 8: 2.0, 12: 1003.0}
    # a new run in the same folder starts every record over
    feed([MetricsFiles(), MetricsCsv(), TensorBoardSink()], info, range(1, 2), offset=500.0)
    assert [s["loss_total"] for s in read_jsonl(tmp_path / "steps.jsonl")] == [501.0, 502.0, 503.0, 504.0]
    assert len(read_rows(tmp_path / CSV_NAME)) == 5
    assert tensorboard_scalars(tmp_path / TENSORBOARD_DIR)["epoch/lr"] == {4: 501.0}


def test_a_line_cut_short_by_a_kill_is_dropped_on_resume_and_a_corrupt_one_is_not_hidden(tmp_path):
    from jrcl_fast.engine.records.metrics_files import read_jsonl as read_records

    info = RunInfo(tmp_path, epochs=3, steps_per_epoch=4, epochs_done=0, config={})
    feed([MetricsFiles()], info, range(1, 3), offset=0.0)
    metrics = tmp_path / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + '{"epoch": 3, "lr": 3.')  # killed while writing epoch 3's line
    assert [r["epoch"] for r in read_records(metrics)] == [1, 2]
    resumed = RunInfo(tmp_path, epochs=3, steps_per_epoch=4, epochs_done=2, config={})
    feed([MetricsFiles()], resumed, range(3, 4), offset=1000.0)
    assert [e["lr"] for e in read_jsonl(metrics)] == [1.0, 2.0, 1003.0]
    metrics.write_text(whole.replace("}\n", "\n", 1))  # a whole line that is not JSON: an error, not a gap
    with pytest.raises(json.JSONDecodeError):
        read_records(metrics)


def test_only_rank_0_writes_files():
    main = build_records(["csv", "tensorboard"], Console(quiet=True), is_main=True)
    assert [type(s) for s in main.sinks] == [MetricsFiles, MetricsCsv, TensorBoardSink, ProgressSink]
    other = build_records(["csv", "tensorboard"], Console(quiet=True), is_main=False)
    assert [type(s) for s in other.sinks] == [ProgressSink]


def test_logger_names_are_checked_and_a_missing_package_is_one_line(tmp_path, monkeypatch):
    import sys

    from jrcl_fast.config import parse_config

    with pytest.raises(UserError, match=r"key 'train.loggers' must be one of csv, tensorboard, got 'wandb'"):
        parse_config({"data": {"name": "digits_lt", "root": "x"}, "train": {"loggers": ["csv", "wandb"]}}, "c.yaml")
    with pytest.raises(UserError, match=r"key 'train.loggers' must be a list of str"):
        parse_config({"data": {"name": "digits_lt", "root": "x"}, "train": {"loggers": "csv"}}, "c.yaml")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as without the package
    with pytest.raises(UserError, match=r"^train.loggers: tensorboard needs the tensorboard package"):
        build_records(["tensorboard"], Console(quiet=True), is_main=True)


def test_resume_may_turn_loggers_on_but_not_change_the_training(tmp_path, digits_root, monkeypatch):
    """train.loggers chooses what is recorded and data.num_workers how fast the data
    loads, not what is trained: a run stopped after epoch 1 resumes with TensorBoard and
    CSV turned on (they record from epoch 2) and another worker count, while another
    learning rate is still refused."""
    from jrcl_fast.config import load_config
    from jrcl_fast.data.catalog import load_dataset
    from jrcl_fast.engine import trainer
    from jrcl_fast.engine.run_setup import check_resume

    config = tiny_config(tmp_path, digits_root, train={"epochs": 2, "batch_size": 64, "threads": 1})
    cfg = load_config(config)
    dataset = load_dataset(cfg.data)
    train_until_killed(cfg, dataset, monkeypatch)
    with pytest.raises(UserError, match="--resume: the config differs"):
        trainer.train(load_config(config, ["optim.lr=0.01"]), dataset, True, False, Console(quiet=True))
    # another worker count is accepted (checked, not trained: workers would fork this process after DALI's threads)
    assert cfg.data.num_workers != 1
    check_resume(load_config(config, ["data.num_workers=1"]), tmp_path / "run" / "checkpoints")
    trainer.train(load_config(config, ["train.loggers=[csv, tensorboard]"]), dataset, True, False, Console(quiet=True))

    run, per_epoch = tmp_path / "run", len(dataset.train) // 64
    assert [e["epoch"] for e in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    rows = read_rows(run / CSV_NAME)
    assert {int(r["epoch"]) for r in rows} == {2}
    assert [int(r["step"]) for r in rows if r["scope"] == "step"] == list(range(per_epoch + 1, 2 * per_epoch + 1))
    assert set(tensorboard_scalars(run / TENSORBOARD_DIR)["epoch/lr"]) == {2 * per_epoch}
