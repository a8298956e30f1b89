"""Checkpoint files, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from jrcl_fast.atomic import atomic_write_bytes
from jrcl_fast.errors import UserError


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; check --checkpoint or train.output_dir")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a foreign or damaged file: say which, not a pickle traceback
        raise UserError(f"checkpoint {path} cannot be read ({type(err).__name__}); it is not a jrcl-fast checkpoint") from None
