"""Progress when stdout is not a terminal: plain lines at an interval and at each epoch's end."""

import io
import re

from rich.console import Console

from jrcl_fast.engine.trainer import PlainProgress, _progress

LINE = re.compile(r"^epoch (\d+)/(\d+) step (\d+)/(\d+) (\d+) img/s loss (\d+\.\d{4}) ETA (\d+):(\d\d):(\d\d)$")


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
                                 loss=float("nan"))
        for epoch in (2, 3):
            for step in range(steps):
                clock.now += 4.0  # 4 s a step: a line every third step, and at each epoch's end
                progress.update(task, advance=1, epoch=epoch, ips=123.4, loss=0.5 + step)
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
        assert float(m[6]) == 0.5 + step - 1


def test_a_terminal_keeps_the_live_bar():
    from rich.progress import Progress

    assert isinstance(_progress(Console(file=io.StringIO(), force_terminal=True), 5, 2), Progress)
    assert isinstance(_progress(Console(file=io.StringIO(), force_terminal=False), 5, 2), PlainProgress)
