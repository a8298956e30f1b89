"""Checkpoint folders, in DeepSpeed's layout, never torn.

A run's `checkpoints/` folder holds one tag folder per saved epoch (`epoch_0003/`) and
a `latest` file naming the newest complete one. Both engines write a tag folder
(DeepSpeed: `mp_rank_00_model_states.pt` with the weights and the client state, plus
ZeRO optimizer shards); `latest` is replaced atomically only after every rank has
written and fsynced its files, so a kill at any moment leaves `latest` naming a whole
checkpoint. Older tag folders, and any half-written one, are deleted after that, except
the epoch selected on validation (train.select_on), which latest's client state names.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from jrcl_fast.atomic import atomic_write_bytes
from jrcl_fast.errors import UserError

CHECKPOINT_DIR = "checkpoints"  # in train.output_dir
LATEST = "latest"
MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's name for the weights file
REVISION_KEY = "architecture_revision"  # of the network the weights belong to (models.jrcl_net)
SELECTION_KEY = "selection"  # engine.selection.Selection's state: which epoch is selected
INIT_FROM_KEY = "init_from"  # where a run's starting weights came from (engine.init_from)
START_OVER = "start the run over with --overwrite"  # the fix for a run's own damaged checkpoints


def epoch_tag(epochs_done: int) -> str:
    return f"epoch_{epochs_done:04d}"


def run_epochs_trained(saved: dict[str, Any]) -> int | None:
    """The epochs the run that wrote `saved` had trained by its latest checkpoint: the
    selection's count (the selected epoch's folder says fewer), else, in a checkpoint
    written before runs kept a selection, its own epoch (None in a file made by hand)."""
    return (saved.get(SELECTION_KEY) or {}).get("epochs_trained", saved.get("epochs_done"))


def training_finished(saved: dict[str, Any]) -> bool:
    """Whether the run that wrote `saved` has stopped training: all of its train.epochs
    done, or its selection stopped it early."""
    stopped_early = bool((saved.get(SELECTION_KEY) or {}).get("stopped_early"))
    return run_epochs_trained(saved) == saved["config"]["train"]["epochs"] or stopped_early


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder` to disk (DeepSpeed's torch.save does not)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def commit_latest(save_dir: Path, tag: str, keep: str | None = None) -> None:
    """Point `latest` at `tag` atomically, then delete every other tag folder but `keep`."""
    atomic_write_bytes(save_dir / LATEST, lambda f: f.write(tag.encode()))
    for other in save_dir.iterdir():
        if other.is_dir() and other.name not in (tag, keep):
            shutil.rmtree(other, ignore_errors=True)


def latest_tag(save_dir: Path) -> str | None:
    path = save_dir / LATEST
    # Decoded leniently: a damaged `latest` then names a missing tag, which readers report.
    return path.read_bytes().decode(errors="replace").strip() if path.is_file() else None


def save_model_states(path: Path, state: dict[str, Any]) -> None:
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def run_dir_of(path: Path) -> Path:
    """The run folder a checkpoint path belongs to (the parent of its checkpoints/)."""
    path = path.resolve()
    for folder in [path, *path.parents]:
        if folder.name == CHECKPOINT_DIR:
            return folder.parent
    return path if path.is_dir() else path.parent


def read_model_states(path: Path, option: str, fix: str | None = None) -> dict[str, Any]:
    """The weights file of a checkpoint, with its client state: `path` is a run's
    checkpoints/ folder (its latest tag), a tag folder, or the weights file itself. The
    user's errors name `option`, the argument or key that gave `path`; `fix` replaces the
    advice for an incomplete or foreign checkpoint (default: point `option` elsewhere)."""
    tag = latest_tag(path) if path.is_dir() else None
    if tag:
        weights = path / tag / MODEL_STATES
    elif path.is_dir():
        weights = path / MODEL_STATES
    else:
        weights = path
    if tag and not weights.is_file():
        raise UserError(f"{option} {path}: its latest epoch's weights, {weights}, are missing; "
                        f"{fix or f'point {option} at another epoch folder in {path}'}")
    if not weights.is_file():
        run = path / CHECKPOINT_DIR  # a run folder is the likeliest slip
        hint = (f"point it at {run}, that run's checkpoints" if latest_tag(run)
                else f"point it at a run's {CHECKPOINT_DIR}/ folder (its train.output_dir/{CHECKPOINT_DIR}) "
                     "after an epoch")
        raise UserError(f"{option} {path} {'holds no checkpoint' if path.exists() else 'does not exist'}; {hint}")
    named = f"{option} {path}" + (f": {weights}" if weights != path else "")
    fix = fix or f"point {option} at a jrcl-fast run's {CHECKPOINT_DIR}/ folder"
    try:
        saved = torch.load(weights, map_location="cpu", weights_only=False)
    except Exception as err:  # a foreign or damaged file: say which, not a pickle traceback
        raise UserError(f"{named} cannot be read ({type(err).__name__}): it is not a jrcl-fast checkpoint, "
                        f"or a damaged one; {fix}") from None
    if not isinstance(saved, dict) or not {"module", "config"} <= saved.keys():
        raise UserError(f"{named} is not a jrcl-fast checkpoint (no 'module' and 'config' entries); {fix}")
    return saved


def read_selected_model_states(path: Path, option: str) -> dict[str, Any]:
    """Like read_model_states, but a run's checkpoints/ folder gives the weights of the
    epoch its run selected (train.select_on), with the latest epoch's account of the choice."""
    saved = read_model_states(path, option)
    selection = saved.get(SELECTION_KEY)
    if path.is_dir() and latest_tag(path) and selection and selection["best_epoch"] != saved["epochs_done"]:
        tag = path / epoch_tag(selection["best_epoch"])
        if not (tag / MODEL_STATES).is_file():
            raise UserError(f"{option} {path}: the weights of the selected epoch {selection['best_epoch']} "
                            f"({tag / MODEL_STATES}) are missing; point {option} at another epoch folder in {path} "
                            "to use that epoch")
        return {**read_model_states(tag, option), SELECTION_KEY: selection}
    return saved
