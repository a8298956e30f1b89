"""The one interface every record of a run goes through: a sink.

The epoch loop calls, in this order: `start` once, then `step_done` after every micro
step, `steps` each time the step losses are read on the host (every
trainer.LOSS_READ_INTERVAL steps), `epoch` at the end of each epoch, and `close` at the
end, after an error too. Every method has a default that does nothing, so a sink
implements what it records and nothing else.

A sink chosen by `train.loggers` registers itself under its name in the LOGGERS
registry (jrcl_fast/registry.py) in its own module of this package, as tensorboard.py
and metrics_csv.py do, so a new one (W&B, MLflow) is one new file. Its constructor takes
no argument and must fail there, with a UserError, when it cannot run (a package
missing): it is built before the run's set-up, so that mistake costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A step record: {"epoch": 1-based epoch, "step": micro steps since the run began,
# "loss_<term>": the global batch's value of each loss term}. An epoch record:
# {"epoch", "lr", "images_per_s", "loss_<term>": the epoch's mean, and
# "val_balanced_accuracy" when the run selects on validation}.
Record = dict[str, float]


@dataclass(frozen=True)
class RunInfo:
    out_dir: Path  # train.output_dir
    epochs: int
    steps_per_epoch: int  # micro steps
    # 0: a new run, whose earlier records (of a run started over) are deleted; else the
    # run resumes after this epoch and records of later epochs (re-run now) are dropped.
    epochs_done: int
    config: dict[str, Any]  # the run's config (config_to_dict), for sinks that store it

    def step_of(self, epoch: int) -> int:
        """The step count at the end of `epoch` (1-based): where an epoch record sits on
        a step axis."""
        return epoch * self.steps_per_epoch


class RecordSink:
    """Where a run's records go (the module docstring gives the call order)."""

    def start(self, info: RunInfo) -> None:
        pass

    def step_done(self, epoch: int, images_per_s: float) -> None:
        """After every micro step of `epoch` (1-based), with the epoch's throughput so far."""

    def steps(self, records: list[Record]) -> None:
        """Step records, in step order."""

    def epoch(self, record: Record) -> None:
        """The epoch record, written before the epoch's checkpoint."""

    def close(self) -> None:
        pass
