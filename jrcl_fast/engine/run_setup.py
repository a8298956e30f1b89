"""Run set-up: everything `train` needs before its first step, in the order it is built.

1. checks of the config and the output folder (before anything is built, so a mistake
   costs nothing: --resume against the checkpoint's config, the validation split);
2. ranks and device, and every split's files (named at minute 0, not at hour 9);
3. the training loader and the steps of an epoch;
4. the training stack: model, optimizer, scheduler, engine and objective
   (build_training_stack, which `jrcl-fast doctor` builds its training check from);
5. resume: the engine loads the latest checkpoint, or a new run clears the old one.

The result is a `Run`, which the epoch loop, evaluation, records and checkpoints read.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from jrcl_fast.checkpoint import (
    CHECKPOINT_DIR,
    REVISION_KEY,
    SELECTION_KEY,
    START_OVER,
    epoch_tag,
    latest_tag,
    read_model_states,
)
from jrcl_fast.config import Config, config_to_dict, parse_config
from jrcl_fast.cores import workers_per_rank
from jrcl_fast.data.class_groups import ClassGroups
from jrcl_fast.data.loader_contract import TrainLoader
from jrcl_fast.data.loaders import build_train_loader
from jrcl_fast.data.long_tailed_dataset import LongTailedDataset
from jrcl_fast.engine.backends import build_engine
from jrcl_fast.engine.contract import TrainingEngine
from jrcl_fast.engine.init_from import describe_provenance, init_from, resumed_provenance
from jrcl_fast.engine.optim import build_optimizer, build_scheduler
from jrcl_fast.engine.selection import Selection
from jrcl_fast.errors import UserError
from jrcl_fast.losses.dispatch import load_implementations
from jrcl_fast.losses.objective import JRCLObjective
from jrcl_fast.models import JRCLNet, check_architecture
from jrcl_fast.runtime import Ranks, select_device
from jrcl_fast.startup import phase

# Scores a model on the validation split (balanced accuracy); every rank calls it.
Validate = Callable[[JRCLNet, torch.device], float]


@dataclass
class TrainingStack:
    """What one optimizer step needs: the engine around the model, and the objective."""

    engine: TrainingEngine
    description: str  # of the engine, for the log: "DeepSpeed, 2 rank(s), bf16, ZeRO stage 0"
    objective: JRCLObjective
    init_from: dict[str, Any] | None  # where the starting weights came from (None: random, or resumed)


@dataclass
class Run:
    """A training run, set up: the state the stages of `train` share."""

    cfg: Config
    dataset: LongTailedDataset
    ranks: Ranks
    device: torch.device
    loader: TrainLoader
    steps_per_epoch: int  # micro steps: whole accumulation cycles of the loader's epoch
    engine: TrainingEngine
    objective: JRCLObjective
    selection: Selection
    validate: Validate | None
    epochs_done: int  # before the loop: 0, or the epochs of the checkpoint resumed
    resumed: bool
    init_from: dict[str, Any] | None  # engine.init_from's provenance, kept in every checkpoint

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / CHECKPOINT_DIR


def check_output_dir(out_dir: Path, resume: bool, overwrite: bool, epochs: int) -> None:
    ckpt_dir = out_dir / CHECKPOINT_DIR
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: --resume continues the run in "
                        f"{out_dir}, --overwrite deletes it and starts over; pass one of them")
    if latest_tag(ckpt_dir) and not (resume or overwrite):
        raise UserError(f"train.output_dir {out_dir} already holds a run; pass --resume to continue it, "
                        "--overwrite to start over, or set another train.output_dir")
    if resume and not latest_tag(ckpt_dir):
        raise UserError(f"--resume: {ckpt_dir} holds no finished epoch; start without --resume")
    if resume and latest_tag(ckpt_dir) == epoch_tag(epochs):
        raise UserError(f"--resume: the run in {out_dir} is complete (all {epochs} epochs trained), nothing is "
                        f"left to resume; evaluate it with 'jrcl-fast eval --checkpoint {ckpt_dir}'")


def check_selection(cfg: Config, dataset: LongTailedDataset, validate: Validate | None) -> Selection:
    selection = Selection(cfg.train.select_on, cfg.train.early_stop_patience)
    if selection.validates and dataset.val is None:
        raise UserError(f"train.select_on={cfg.train.select_on} chooses on the validation split, and "
                        f"{dataset.name} has none; use train.select_on=last")
    if selection.validates and validate is None:
        raise ValueError(f"train(): train.select_on={cfg.train.select_on} needs a `validate` function")
    return selection


# Keys that choose what a run records or how fast it loads, not what it trains: --resume may
# change them (turn TensorBoard on halfway; go on on a node with other cores, or from a
# checkpoint of before num_workers' default changed). Both loaders draw each sample's views
# from its own seed, so batches do not depend on the worker count (test_data_loaders.py).
FREE_ON_RESUME = {"train": ("loggers",), "data": ("num_workers",)}


def trained_config(cfg: Config) -> dict[str, Any]:
    """`cfg` as a dict without FREE_ON_RESUME: what must match for a run to continue."""
    return {section: {key: value for key, value in values.items() if key not in FREE_ON_RESUME.get(section, ())}
            for section, values in config_to_dict(cfg).items()}


def check_resume(cfg: Config, ckpt_dir: Path) -> dict[str, Any]:
    """The latest checkpoint's model states, once they are known to continue `cfg`:
    checked before anything is built, and before the engine loads the weights."""
    saved = read_model_states(ckpt_dir, "--resume", fix=START_OVER)
    # Parsed again, so that keys added since the checkpoint take their defaults.
    if trained_config(parse_config(saved["config"], str(ckpt_dir))) != trained_config(cfg):
        raise UserError(f"--resume: the config differs from the one {ckpt_dir} was trained with; "
                        "resume with the same config and --set overrides")
    check_architecture(saved.get(REVISION_KEY), cfg.model, f"--resume: {ckpt_dir}")
    selection = Selection.from_summary(saved[SELECTION_KEY]) if SELECTION_KEY in saved else None
    if selection is not None and selection.stopped_early:
        raise UserError(f"--resume: the run in {ckpt_dir.parent} is complete (stopped early after epoch "
                        f"{selection.epochs_trained}); evaluate it with 'jrcl-fast eval --checkpoint {ckpt_dir}'")
    return saved


def build_train_data(cfg: Config, dataset: LongTailedDataset, ranks: Ranks) -> tuple[TrainLoader, int]:
    """This rank's training loader and the micro steps of an epoch: whole accumulation
    cycles, so that an epoch's checkpoint holds no partial gradient."""
    loader = build_train_loader(dataset, cfg.data, cfg.train.batch_size, cfg.train.seed, ranks.rank,
                                ranks.world_size)
    accum = cfg.train.gradient_accumulation_steps
    steps = len(loader) // accum * accum
    if steps == 0:
        raise UserError(f"train.gradient_accumulation_steps {accum} exceeds the {len(loader)} steps of an epoch; "
                        "lower it or train.batch_size")
    return loader, steps


def build_training_stack(cfg: Config, ranks: Ranks, device: torch.device, num_classes: int,
                         train_counts: np.ndarray, normal_mask: np.ndarray, steps_per_epoch: int,
                         console: Console | None = None, class_names: list[str] = (),
                         resuming: bool = False) -> TrainingStack:
    """The model (seeded with train.seed), its optimizer and schedule, the engine for this
    run (backends.build_engine) and the objective; each phase shown on `console`. With
    train.init_from the model starts from that run's weights (`class_names` checked against
    it), frozen as train.trainable says, before the optimizer sees its parameters; `resuming`
    only freezes, as the engine then loads every weight from the run's own checkpoint."""
    torch.manual_seed(cfg.train.seed)
    with phase(console, "model") as shown:
        model = JRCLNet(cfg.model, num_classes).to(device)
        source = init_from(model, cfg, list(class_names), resuming)
        shown.detail = (f"{cfg.model.backbone}, {num_classes:,} classes, "
                        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {device}"
                        + (f"; from {describe_provenance(source)}" if source else ""))
    with phase(console, "engine") as shown:
        optimizer = build_optimizer(cfg.optim, model)
        scheduler = build_scheduler(cfg.optim, optimizer, steps_per_epoch // cfg.train.gradient_accumulation_steps,
                                    cfg.train.epochs)
        engine, description = build_engine(cfg, ranks, device, model, optimizer, scheduler)
        shown.detail = description
    with phase(console, "kernels") as shown:
        objective = JRCLObjective(cfg.loss, train_counts, normal_mask, device)
        shown.detail = load_implementations(cfg.loss.backend, device)
    return TrainingStack(engine, description, objective, source)


def set_up_run(cfg: Config, dataset: LongTailedDataset, resume: bool, overwrite: bool, console: Console,
               ranks: Ranks, validate: Validate | None, groups: ClassGroups) -> Run:
    """Checks, device, data, training stack and resume, in that order (module docstring);
    the objective's normal group is `groups`' (the run's class groups)."""
    out_dir = Path(cfg.train.output_dir)
    check_output_dir(out_dir, resume, overwrite, cfg.train.epochs)
    selection = check_selection(cfg, dataset, validate)
    saved = check_resume(cfg, out_dir / CHECKPOINT_DIR) if resume else {}
    if SELECTION_KEY in saved:
        selection = Selection.from_summary(saved[SELECTION_KEY])
    with phase(console, "files") as shown:  # every split the run and check-data read, not at hour 9
        dataset.check_files_exist(dataset.splits(), ranks.rank, ranks.world_size)
        shown.detail = f"every image of {', '.join(dataset.splits())} is there"
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = select_device(cfg.train.device, ranks)

    with phase(console, "loaders") as shown:
        loader, steps = build_train_data(cfg, dataset, ranks)
        workers, why = workers_per_rank(cfg.data.num_workers)
        shown.detail = f"{cfg.data.loader}, {workers} workers per rank ({why})"
    stack = build_training_stack(cfg, ranks, device, dataset.num_classes, dataset.train_counts,
                                 groups.normal_mask, steps, console, dataset.class_names, resume)
    run = Run(cfg, dataset, ranks, device, loader, steps, stack.engine, stack.objective, selection, validate,
              epochs_done=saved.get("epochs_done", 0), resumed=resume,
              init_from=resumed_provenance(cfg, saved) if resume else stack.init_from)
    resume_or_start_over(run, console)
    console.print(f"Training with the {stack.description}; global batch "
                  f"{cfg.train.batch_size * ranks.world_size * cfg.train.gradient_accumulation_steps} images")
    return run


def resume_or_start_over(run: Run, console: Console) -> None:
    """Load the latest checkpoint into the engine, or clear the checkpoints of an old run:
    an old `latest` must not survive to be resumed by mistake."""
    if run.resumed:
        run.engine.load_checkpoint(str(run.ckpt_dir), latest_tag(run.ckpt_dir))
        started = f" (it started from {describe_provenance(run.init_from)})" if run.init_from else ""
        console.print(f"Resuming {run.out_dir} after epoch {run.epochs_done}{started}")
    elif run.ranks.is_main:
        shutil.rmtree(run.ckpt_dir, ignore_errors=True)
