"""Progress when stdout is not a terminal: plain lines at an interval and at each epoch's
end; the step losses, read on the host once per interval rather than every step."""

import io
import json
import re

import pytest
import torch
from helpers import tiny_config
from rich.console import Console

from jrcl_fast.engine import trainer
from jrcl_fast.engine.records.progress import PlainProgress, progress_display
from jrcl_fast.errors import UserError

LINE = re.compile(r"^epoch (\d+)/(\d+) step (\d+)/(\d+) (\d+) img/s loss (\d+\.\d{4}|-) ETA (\d+):(\d\d):(\d\d)$")


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_log_file_gets_plain_lines_at_an_interval_and_at_each_epoch_end():
    out, clock = io.StringIO(), FakeClock()
    console = Console(file=out, width=60)  # narrow: a plain line must not wrap like a table
    steps, epochs, done_before = 7, 3, 7  # resumed after epoch 1
    with PlainProgress(console, steps, epochs, interval_s=10.0, clock=clock) as progress:
        task = progress.add_task("train", total=steps * epochs, completed=done_before, epoch=2, ips=0.0,
                                 loss="-")
        for epoch in (2, 3):
            for step in range(steps):
                clock.now += 4.0  # 4 s a step: a line every third step, and at each epoch's end
                # the loop reads the loss every few steps: "-" until the first read
                shown = "-" if (epoch, step) < (2, 3) else f"{0.5 + step:.4f}"
                progress.update(task, advance=1, epoch=epoch, ips=123.4, loss=shown)
    lines = out.getvalue().splitlines()
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    where = [(int(m[1]), int(m[3])) for m in parsed]
    assert where == [(2, 3), (2, 6), (2, 7), (3, 3), (3, 6), (3, 7)]
    assert {(m[2], m[4], m[5]) for m in parsed} == {("3", "7", "123")}
    # ETA: steps left x 4 s per step measured since the start of this process.
    for m, (epoch, step) in zip(parsed, where):
        left = steps * epochs - ((epoch - 1) * steps + step)
        assert int(m[7]) * 3600 + int(m[8]) * 60 + int(m[9]) == 4 * left
        assert m[6] == ("-" if (epoch, step) == (2, 3) else f"{0.5 + step - 1:.4f}")


def test_a_terminal_keeps_the_live_bar():
    from rich.progress import Progress

    assert isinstance(progress_display(Console(file=io.StringIO(), force_terminal=True), 5, 2), Progress)
    assert isinstance(progress_display(Console(file=io.StringIO(), force_terminal=False), 5, 2), PlainProgress)


def test_step_losses_are_read_once_per_interval_and_every_step_is_logged(tmp_path, digits_root, monkeypatch):
    from jrcl_fast.config import load_config
    from jrcl_fast.data.catalog import load_dataset

    reads = []
    read_losses = trainer.read_losses
    monkeypatch.setattr(trainer, "read_losses", lambda pending, *args: reads.append(len(pending))
                        or read_losses(pending, *args))
    monkeypatch.setattr(trainer, "LOSS_READ_INTERVAL", 4)
    cfg = load_config(tiny_config(tmp_path, digits_root, train={"epochs": 1, "batch_size": 16, "threads": 1}))
    dataset = load_dataset(cfg.data)
    trainer.train(cfg, dataset, False, False, Console(quiet=True))

    steps = len(dataset.train) // 16
    assert reads == [4] * (steps // 4) + [steps % 4] * (steps % 4 > 0)
    logged = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert [record["step"] for record in logged] == list(range(1, steps + 1))
    (metrics,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics["loss_total"] == pytest.approx(sum(r["loss_total"] for r in logged) / steps)


def test_a_non_finite_loss_stops_the_run_at_its_step():
    pending = [{"ce": torch.tensor(1.0), "total": torch.tensor(2.0)},
               {"ce": torch.tensor(1.0), "total": torch.tensor(float("inf"))},
               {"ce": torch.tensor(float("nan")), "total": torch.tensor(float("nan"))}]
    assert trainer.read_losses(pending[:1], 0, 0) == [{"ce": 1.0, "total": 2.0}]
    with pytest.raises(UserError, match=r"^training diverged in epoch 3, step 12 \(non-finite loss\)"):
        trainer.read_losses(pending, 2, 10)
