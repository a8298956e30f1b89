"""The engine contract: what the training loop, the checkpoints and `jrcl-fast doctor`
may ask of an engine.

DeepSpeed's engine satisfies it as it is; LocalEngine (backends.py) implements it for
a plain one-process fp32 run. Nothing above the engine reads a field outside it, so
either engine can be swapped in without the loop knowing which one runs
(tests/test_engine_contract.py checks both against it).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class TrainingEngine(Protocol):
    # The model being trained, in the engine's precision (bf16/fp16 under DeepSpeed).
    module: nn.Module
    # Optimizer steps taken, skipped ones included, and those skipped on an fp16
    # overflow (0 in fp32 and bf16): an applied step is one of the first not the second.
    global_steps: int
    skipped_steps: int

    def __call__(self, *inputs: Any) -> Any:
        """The module's forward pass."""
        ...

    def backward(self, loss: Tensor) -> Any:
        """Back-propagate `loss` divided by the gradient accumulation steps (scaled
        under fp16 loss scaling)."""
        ...

    def step(self) -> Any:
        """One micro step: an optimizer and scheduler step at each accumulation boundary."""
        ...

    def get_lr(self) -> list[float]:
        """The learning rate of each parameter group."""
        ...

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict[str, Any],
                        save_latest: bool = ...) -> Any:
        """Write `save_dir/tag/` in DeepSpeed's layout, with `client_state` in the model states."""
        ...

    def load_checkpoint(self, load_dir: str, tag: str) -> tuple[str | None, dict[str, Any] | None]:
        """Restore weights, optimizer and scheduler from `load_dir/tag/`; returns the path
        read and the client state."""
        ...
