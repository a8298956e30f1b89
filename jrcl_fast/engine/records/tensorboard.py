"""train.loggers: [tensorboard]: TensorBoard events in train.output_dir/tensorboard/,
through torch.utils.tensorboard (the `tensorboard` package: pip install
"jrcl_fast[tensorboard]"). Scalars `step/loss_<term>` at every step and
`epoch/<metric>` at the step that ends each epoch, so both share one step axis, and a
resumed run purges the events of the steps it runs again."""

from __future__ import annotations

import shutil

from jrcl_fast.engine.records.sink import Record, RecordSink, RunInfo
from jrcl_fast.errors import UserError
from jrcl_fast.registry import LOGGERS

TENSORBOARD_DIR = "tensorboard"


class TensorBoardSink(RecordSink):
    def __init__(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("train.loggers: tensorboard needs the tensorboard package; install it with "
                            "pip install 'jrcl_fast[tensorboard]' (or tensorboard), or remove it from "
                            "train.loggers") from None
        self.writer_class = SummaryWriter

    def start(self, info: RunInfo) -> None:
        folder = info.out_dir / TENSORBOARD_DIR
        if not info.epochs_done:
            shutil.rmtree(folder, ignore_errors=True)
        self.info = info
        # TensorBoard hides the events at or after purge_step written before a restart.
        purge = info.step_of(info.epochs_done) + 1 if info.epochs_done else None
        self.writer = self.writer_class(log_dir=str(folder), purge_step=purge)

    def steps(self, records: list[Record]) -> None:
        for record in records:
            for name, value in record.items():
                if name.startswith("loss_"):
                    self.writer.add_scalar(f"step/{name}", value, record["step"])

    def epoch(self, record: Record) -> None:
        step = self.info.step_of(record["epoch"])
        for name, value in record.items():
            if name != "epoch":
                self.writer.add_scalar(f"epoch/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


LOGGERS.register("tensorboard", TensorBoardSink)
