"""The training run as named stages: set-up (run_setup.py), then per epoch the steps
(train_epoch), validation and selection, the records (records/) and the checkpoint;
at the end, the selected weights.

One loop for every engine (the engine contract, contract.py): DeepSpeed with any number
of ranks, or the local fp32 engine of a plain one-process CPU run.

Resuming is exact on the CPU: the sample order and the augmentation randomness of an
epoch depend only on (seed, epoch) and the sample's place in the global batch, and a
checkpoint is written after every epoch, so a run killed anywhere and resumed repeats
the interrupted epoch bit for bit. Rank 0 writes the records.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import torch
from rich.console import Console

from jrcl_fast.checkpoint import (
    INIT_FROM_KEY,
    REVISION_KEY,
    SELECTION_KEY,
    START_OVER,
    commit_latest,
    epoch_tag,
    fsync_tree,
    read_model_states,
)
from jrcl_fast.config import Config, config_to_dict
from jrcl_fast.data.class_groups import ClassGroups
from jrcl_fast.data.long_tailed_dataset import LongTailedDataset
from jrcl_fast.engine.contract import TrainingEngine
from jrcl_fast.engine.records import Record, Records, RunInfo, build_records
from jrcl_fast.engine.run_setup import Run, Validate, set_up_run
from jrcl_fast.errors import UserError
from jrcl_fast.losses.checks import NonFiniteError
from jrcl_fast.losses.objective import JRCLObjective
from jrcl_fast.models import ARCHITECTURE_REVISION, JRCLNet
from jrcl_fast.runtime import Ranks, collective_failures, is_distributed, mean_over_ranks

# Steps between reads of the losses on the host: each read waits for the device to finish
# the queued steps, so reading every step would stall a GPU's pipeline at every step.
LOSS_READ_INTERVAL = 25


@collective_failures()
def train(cfg: Config, dataset: LongTailedDataset, resume: bool, overwrite: bool, console: Console,
          ranks: Ranks = Ranks(), validate: Validate | None = None,
          groups: ClassGroups | None = None) -> tuple[JRCLNet, torch.device, dict]:
    """Train `cfg` on `dataset` as rank `ranks.rank`. Returns the selected weights
    (train.select_on) in an fp32 model, the device it lives on, and their provenance for
    results.json: how they were selected (Selection.summary) and, with train.init_from,
    where the run started. `validate(model, device)` scores a model on the validation
    split; the caller supplies it (evaluation sits above the engine), and `groups`, the run's
    class groups, which it evaluates with too (derived here when not given). Checkpoints
    go to train.output_dir/checkpoints."""
    records = build_records(cfg.train.loggers, console, ranks.is_main)  # a logger that cannot run fails here
    run = set_up_run(cfg, dataset, resume, overwrite, console, ranks, validate,
                     groups or ClassGroups(dataset, cfg.data))
    with records.opened(run_info(run)):
        for epoch in range(run.epochs_done, cfg.train.epochs):
            record = train_epoch(run, epoch, records)
            record.update(validate_and_select(run, epoch + 1))
            records.epoch(record)  # before the checkpoint: a kill between the two leaves lines --resume drops
            save_epoch(run, epoch + 1)
            if run.selection.stopped_early:
                console.print(f"Stopping early after epoch {epoch + 1}: no better validation balanced accuracy "
                              f"for {run.selection.patience} epochs (best {run.selection.best_value:.4f}, "
                              f"epoch {run.selection.best_epoch})")
                break
    return selected_model(run), run.device, results_provenance(run)


def results_provenance(run: Run) -> dict:
    """How the run's weights came to be: the selection, and train.init_from's source."""
    return {SELECTION_KEY: run.selection.summary(), **({INIT_FROM_KEY: run.init_from} if run.init_from else {})}


def run_info(run: Run) -> RunInfo:
    return RunInfo(run.out_dir, run.cfg.train.epochs, run.steps_per_epoch, run.epochs_done,
                   config_to_dict(run.cfg))


def train_epoch(run: Run, epoch: int, records: Records) -> Record:
    """One epoch (0-based `epoch`) of steps; returns its record: learning rate, images/s
    and the mean of every loss term. Step records go to `records` at every read."""
    run.engine.module.train()
    seed_epoch(run.cfg.train.seed, epoch)
    steps, sums = run.steps_per_epoch, {}  # sums of the loss terms over the epoch
    pending: list[dict[str, torch.Tensor]] = []  # loss terms not yet read on the host
    images_seen, start = 0, time.perf_counter()
    for step, (images, labels) in enumerate(itertools.islice(run.loader.epoch(epoch), steps)):
        try:
            pending.append(train_step(run.engine, run.objective, images, labels, run.device))
        except NonFiniteError as err:
            raise diverged(epoch, step, str(err)) from None
        if len(pending) == LOSS_READ_INTERVAL or step + 1 == steps:
            first = step + 1 - len(pending)
            rows = read_losses(pending, epoch, first)
            pending = []
            for row in rows:
                for name, value in row.items():
                    sums[name] = sums.get(name, 0.0) + value
            records.steps([{"epoch": epoch + 1, "step": epoch * steps + first + i + 1,
                            **{f"loss_{name}": value for name, value in row.items()}} for i, row in enumerate(rows)])
        images_seen += labels.shape[0] * run.ranks.world_size
        records.step_done(epoch + 1, images_seen / (time.perf_counter() - start))
    seconds = time.perf_counter() - start
    return {"epoch": epoch + 1, "lr": run.engine.get_lr()[0], "images_per_s": images_seen / seconds,
            **{f"loss_{name}": total / steps for name, total in sums.items()}}


def validate_and_select(run: Run, epochs_done: int) -> Record:
    """Score the epoch's weights on the validation split when the run selects on it, and
    update the selection; returns what goes into the epoch record."""
    value = None
    if run.selection.validates:
        value = run.validate(fp32_copy(run.engine.module, run.cfg, run.dataset.num_classes, run.device), run.device)
    run.selection.update(epochs_done, value)
    return {} if value is None else {"val_balanced_accuracy": value}


def save_epoch(run: Run, epochs_done: int) -> None:
    """The epoch's checkpoint, with what --resume and `jrcl-fast eval` read beside the
    weights; it keeps the selected epoch's folder."""
    save(run.engine, run.ckpt_dir, epochs_done, {"epochs_done": epochs_done, "config": config_to_dict(run.cfg),
                                                 "class_names": run.dataset.class_names,
                                                 REVISION_KEY: ARCHITECTURE_REVISION,
                                                 SELECTION_KEY: run.selection.summary(),
                                                 INIT_FROM_KEY: run.init_from}, run.ranks,
         keep=epoch_tag(run.selection.best_epoch))


def selected_model(run: Run) -> JRCLNet:
    """The selected epoch's weights in an fp32 model: the last epoch's from the engine, an
    earlier one's from the folder save() kept."""
    model = fp32_copy(run.engine.module, run.cfg, run.dataset.num_classes, run.device)
    if run.selection.best_epoch != run.selection.epochs_trained:
        selected = read_model_states(run.ckpt_dir / epoch_tag(run.selection.best_epoch), "train.output_dir",
                                     fix=START_OVER)
        model.load_state_dict(selected["module"])
    return model


def seed_epoch(seed: int, epoch: int) -> None:
    """Fix torch's global generator per epoch (augmentations reseed per sample)."""
    torch.manual_seed(seed * 1_000_003 + epoch)


def diverged(epoch: int, step: int, what: str) -> UserError:
    return UserError(f"training diverged in epoch {epoch + 1}, step {step + 1} ({what}); "
                     "lower optim.lr or raise optim.warmup_epochs, then start again")


def read_losses(pending: list[dict[str, torch.Tensor]], epoch: int, first_step: int) -> list[dict[str, float]]:
    """The global batch's loss terms of the `pending` steps on the host: one all-reduce
    and one device wait for all of them. Every rank sees the same values, so a
    non-finite one stops every rank at once (UserError naming the first such step)."""
    names = list(pending[0])
    stacked = torch.stack([torch.stack([terms[name].float() for name in names]) for terms in pending])
    rows = mean_over_ranks(stacked).tolist()
    for i, row in enumerate(rows):
        if not all(math.isfinite(value) for value in row):
            raise diverged(epoch, first_step + i, "non-finite loss")
    return [dict(zip(names, row)) for row in rows]


def train_step(engine: TrainingEngine, objective: JRCLObjective, images: torch.Tensor, labels: torch.Tensor,
               device: torch.device) -> dict[str, torch.Tensor]:
    """One micro step on a batch of `images` (B x views x 3 x H x W): every view in one
    backbone pass, the objective in fp32, backward, step. Returns the detached terms, on
    the device (the loop reads them every LOSS_READ_INTERVAL steps); raises
    NonFiniteError when the objective's value checks find non-finite outputs."""
    # bf16/fp16 engines hold the weights in half precision: feed them in that dtype.
    images = images.to(device, next(engine.module.parameters()).dtype, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    batch, views = images.shape[:2]
    # View-major rows: [view 0 of every image; view 1; ...] in one backbone pass.
    out = engine(images.transpose(0, 1).reshape(views * batch, *images.shape[2:]))
    try:
        # The logits stay in the model's dtype: the losses upcast them themselves, and a
        # float32 copy would lose the classifier's aligned rows (models/jrcl_net.py).
        loss, terms = objective(out.logits, out.binary_logits.float(), out.features.float(),
                                labels, views, engine.module.normalized_prototypes().float())
    except NonFiniteError as err:
        raise NonFiniteError(f"non-finite model outputs: {err}") from None
    engine.backward(loss)
    engine.step()
    return terms


def save(engine: TrainingEngine, ckpt_dir: Path, epochs_done: int, client_state: dict, ranks: Ranks, keep: str) -> None:
    """Write the epoch's tag folder on every rank, flush it, then let rank 0 move `latest`
    (keeping the tag folder `keep`: the selected epoch's)."""
    tag = epoch_tag(epochs_done)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    fsync_tree(ckpt_dir / tag)
    if is_distributed():
        torch.distributed.barrier()  # every rank's files are on disk before `latest` names them
    if ranks.is_main:
        commit_latest(ckpt_dir, tag, keep)


def fp32_copy(module: torch.nn.Module, cfg: Config, num_classes: int, device: torch.device) -> JRCLNet:
    """The trained weights in a plain fp32 JRCLNet, as `jrcl-fast eval` loads them."""
    model = JRCLNet.to_load(cfg.model, num_classes).to(device)
    model.load_state_dict(module.state_dict())
    return model
