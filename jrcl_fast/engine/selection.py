"""Which epoch's weights a run keeps, and when it stops.

train.select_on: last keeps the final epoch. val_balanced_accuracy evaluates the
validation split after every epoch, keeps the epoch with the best balanced accuracy
(the earliest among equals), and with train.early_stop_patience > 0 stops once that
many epochs in a row have not beaten it. The test split is never looked at to choose.
The state travels in every checkpoint, so a resumed run selects as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Selection:
    select_on: str
    patience: int  # 0: train every epoch
    best_epoch: int = 0
    best_value: float | None = None  # the validation metric of best_epoch (None under `last`)
    epochs_trained: int = 0
    stopped_early: bool = False

    @property
    def validates(self) -> bool:
        return self.select_on != "last"

    def update(self, epoch: int, value: float | None) -> bool:
        """Record epoch `epoch` (1-based) and its validation value; True when it is the new
        selection. Sets stopped_early when the patience has run out."""
        self.epochs_trained = epoch
        improved = not self.validates or self.best_value is None or value > self.best_value
        if improved:
            self.best_epoch, self.best_value = epoch, value
        elif self.patience and epoch - self.best_epoch >= self.patience:
            self.stopped_early = True
        return improved

    def summary(self) -> dict:
        """The state and the reason for the choice: what checkpoints and results.json hold."""
        why = ("the last epoch" if not self.validates else
               f"the best validation balanced accuracy ({self.best_value:.4f}) of {self.epochs_trained} epochs")
        if self.stopped_early:
            why += f"; stopped after {self.patience} epochs without improvement"
        return {**asdict(self), "reason": why}

    @classmethod
    def from_summary(cls, summary: dict) -> Selection:
        """The Selection whose summary() checkpoints hold (what --resume continues)."""
        return cls(**{name: value for name, value in summary.items() if name != "reason"})
