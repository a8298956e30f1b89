"""The training loop: epochs of JRCL steps, per-step and per-epoch metrics, checkpoints.

One loop for every engine (backends.py): DeepSpeed with any number of ranks, or the
local fp32 engine of a plain one-process CPU run.

Resuming is exact on the CPU: the sample order and the augmentation randomness of an
epoch depend only on (seed, epoch) and the sample's place in the global batch, and a
checkpoint is written after every epoch, so a run killed anywhere and resumed repeats
the interrupted epoch bit for bit. Rank 0 writes the metrics.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from jrcl_fast.atomic import atomic_write_bytes
from jrcl_fast.checkpoint import (
    CHECKPOINT_DIR,
    REVISION_KEY,
    SELECTION_KEY,
    commit_latest,
    epoch_tag,
    fsync_tree,
    latest_tag,
    read_model_states,
)
from jrcl_fast.config import Config, config_to_dict, parse_config
from jrcl_fast.data.class_groups import normal_class_mask
from jrcl_fast.data.dataset import LongTailedDataset
from jrcl_fast.data.loaders import build_train_loader
from jrcl_fast.engine.backends import build_engine
from jrcl_fast.engine.init_from import init_from
from jrcl_fast.engine.optim import build_optimizer, build_scheduler
from jrcl_fast.engine.selection import Selection
from jrcl_fast.errors import UserError
from jrcl_fast.losses.checks import NonFiniteError
from jrcl_fast.losses.objective import JRCLObjective
from jrcl_fast.models import ARCHITECTURE_REVISION, JRCLNet, check_architecture
from jrcl_fast.runtime import Ranks, collective_failures, is_distributed, mean_over_ranks, select_device

METRICS_NAME = "metrics.jsonl"
STEPS_NAME = "steps.jsonl"
# Scores a model on the validation split (balanced accuracy); every rank calls it.
Validate = Callable[[JRCLNet, torch.device], float]
# Steps between reads of the losses on the host: each read waits for the device to finish
# the queued steps, so reading every step would stall a GPU's pipeline at every step.
LOSS_READ_INTERVAL = 25


def seed_epoch(seed: int, epoch: int) -> None:
    """Fix torch's global generator per epoch (augmentations reseed per sample)."""
    torch.manual_seed(seed * 1_000_003 + epoch)


def diverged(epoch: int, step: int, what: str) -> UserError:
    return UserError(f"training diverged in epoch {epoch + 1}, step {step + 1} ({what}); "
                     "lower optim.lr or raise optim.warmup_epochs, then start again")


def _trim_jsonl(path: Path, epochs_done: int) -> None:
    """Drop metric lines of epochs after the checkpoint: they will be run again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["epoch"] <= epochs_done]
    atomic_write_bytes(path, lambda f: f.write("".join(f"{line}\n" for line in kept).encode()))


def _append_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("a") as f:
        f.write("".join(json.dumps(record) + "\n" for record in records))
        f.flush()


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


PLAIN_PROGRESS_INTERVAL_S = 30.0  # between plain progress lines, besides one at each epoch's end


class PlainProgress:
    """The progress display when stdout is not a terminal (a log file, a cluster
    scheduler): a plain line every `interval_s` seconds and at the end of each epoch,
    with the progress bar's fields. Takes the rich Progress calls the loop makes."""

    def __init__(self, console: Console, steps_per_epoch: int, epochs: int,
                 interval_s: float = PLAIN_PROGRESS_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.console, self.steps_per_epoch, self.epochs = console, steps_per_epoch, epochs
        self.interval_s, self.clock = interval_s, clock

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def add_task(self, description: str, total: int, completed: int, **fields: float) -> int:
        self.total, self.completed, self.first = total, completed, completed
        self.start = self.last_line = self.clock()
        return 0

    def update(self, task: int, advance: int, epoch: int, ips: float, loss: str) -> None:
        self.completed += advance
        step = self.completed - (epoch - 1) * self.steps_per_epoch
        now = self.clock()
        if step < self.steps_per_epoch and now - self.last_line < self.interval_s:
            return
        self.last_line = now
        seconds_per_step = (now - self.start) / max(self.completed - self.first, 1)
        eta = datetime.timedelta(seconds=round(seconds_per_step * (self.total - self.completed)))
        self.console.print(f"epoch {epoch}/{self.epochs} step {step}/{self.steps_per_epoch} "
                           f"{ips:.0f} img/s loss {loss} ETA {eta}", markup=False, highlight=False)


def _progress(console: Console, steps_per_epoch: int, epochs: int) -> Progress | PlainProgress:
    """A live bar on a terminal; plain lines at an interval otherwise."""
    if not console.is_terminal:
        return PlainProgress(console, steps_per_epoch, epochs)
    return Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[ips]:>6.0f} img/s"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _check_output_dir(out_dir: Path, resume: bool, overwrite: bool, epochs: int) -> None:
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


@collective_failures()
def train(cfg: Config, dataset: LongTailedDataset, resume: bool, overwrite: bool, console: Console,
          ranks: Ranks = Ranks(), validate: Validate | None = None) -> tuple[JRCLNet, torch.device, dict]:
    """Train `cfg` on `dataset` as rank `ranks.rank`. Returns the selected weights
    (train.select_on) in an fp32 model, the device it lives on, and how they were selected
    (Selection.summary). `validate(model, device)` scores a model on the validation split;
    the caller supplies it (evaluation sits above the engine). Checkpoints go to
    train.output_dir/checkpoints."""
    out_dir = Path(cfg.train.output_dir)
    ckpt_dir, metrics_path, steps_path = out_dir / CHECKPOINT_DIR, out_dir / METRICS_NAME, out_dir / STEPS_NAME
    _check_output_dir(out_dir, resume, overwrite, cfg.train.epochs)
    selection = Selection(cfg.train.select_on, cfg.train.early_stop_patience)
    if selection.validates and dataset.val is None:
        raise UserError(f"train.select_on={cfg.train.select_on} chooses on the validation split, and "
                        f"{dataset.name} has none; use train.select_on=last")
    if selection.validates and validate is None:
        raise ValueError(f"train(): train.select_on={cfg.train.select_on} needs a `validate` function")
    if resume:  # checked before anything is built, and before the engine loads the weights
        saved = read_model_states(ckpt_dir)
        # Parsed again, so that keys added since the checkpoint take their defaults.
        if config_to_dict(parse_config(saved["config"], str(ckpt_dir))) != config_to_dict(cfg):
            raise UserError(f"--resume: the config differs from the one {ckpt_dir} was trained with; "
                            "resume with the same config and --set overrides")
        check_architecture(saved.get(REVISION_KEY), cfg.model, f"--resume: {ckpt_dir}")
        if SELECTION_KEY in saved:
            selection = Selection.from_summary(saved[SELECTION_KEY])
        if selection.stopped_early:
            raise UserError(f"--resume: the run in {out_dir} is complete (stopped early after epoch "
                            f"{selection.epochs_trained}); evaluate it with 'jrcl-fast eval --checkpoint {ckpt_dir}'")
    # every split the run and check-data read, not at hour 9
    dataset.check_files_exist(dataset.splits(), ranks.rank, ranks.world_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = select_device(cfg.train.device, ranks)

    torch.manual_seed(cfg.train.seed)
    model = JRCLNet(cfg.model, dataset.num_classes).to(device)
    init_from(model, cfg, dataset.class_names)
    loader = build_train_loader(dataset, cfg.data, cfg.train.batch_size, cfg.train.seed, ranks.rank,
                                ranks.world_size)
    accum = cfg.train.gradient_accumulation_steps
    # Whole accumulation cycles per epoch, so that an epoch's checkpoint holds no partial gradient.
    micro_steps = len(loader) // accum * accum
    if micro_steps == 0:
        raise UserError(f"train.gradient_accumulation_steps {accum} exceeds the {len(loader)} steps of an epoch; "
                        "lower it or train.batch_size")
    optimizer = build_optimizer(cfg.optim, model)
    scheduler = build_scheduler(cfg.optim, optimizer, micro_steps // accum, cfg.train.epochs)
    engine, description = build_engine(cfg, ranks, device, model, optimizer, scheduler)
    objective = JRCLObjective(cfg.loss, dataset.train_counts, normal_class_mask(dataset, cfg.data), device)

    epochs_done = 0
    if resume:
        engine.load_checkpoint(str(ckpt_dir), latest_tag(ckpt_dir))
        epochs_done = saved["epochs_done"]
        console.print(f"Resuming {out_dir} after epoch {epochs_done}")
        if ranks.is_main:
            _trim_jsonl(metrics_path, epochs_done)
            _trim_jsonl(steps_path, epochs_done)
    elif ranks.is_main:
        # Starting over: an old `latest` must not survive to be resumed by mistake.
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        metrics_path.unlink(missing_ok=True)
        steps_path.unlink(missing_ok=True)
    console.print(f"Training with the {description}; global batch "
                  f"{cfg.train.batch_size * ranks.world_size * accum} images")

    with _progress(console, micro_steps, cfg.train.epochs) as progress:
        task = progress.add_task("train", total=micro_steps * cfg.train.epochs,
                                 completed=micro_steps * epochs_done, epoch=epochs_done + 1, ips=0.0,
                                 loss="-")
        # The latest loss read on the host (every LOSS_READ_INTERVAL steps): "-" before the first.
        shown_loss = "-"
        for epoch in range(epochs_done, cfg.train.epochs):
            engine.module.train()
            seed_epoch(cfg.train.seed, epoch)
            sums: dict[str, float] = {}
            pending: list[dict[str, torch.Tensor]] = []  # loss terms not yet read on the host
            images_seen, start = 0, time.perf_counter()
            for step, (images, labels) in enumerate(itertools.islice(loader.epoch(epoch), micro_steps)):
                batch = labels.shape[0]
                try:
                    pending.append(train_step(engine, objective, images, labels, device))
                except NonFiniteError as err:
                    raise diverged(epoch, step, str(err)) from None
                if len(pending) == LOSS_READ_INTERVAL or step + 1 == micro_steps:
                    first = step + 1 - len(pending)
                    rows = read_losses(pending, epoch, first)
                    pending = []
                    for row in rows:
                        for name, value in row.items():
                            sums[name] = sums.get(name, 0.0) + value
                    shown_loss = f"{rows[-1]['total']:.4f}"
                    if ranks.is_main:
                        _append_jsonl(steps_path, [
                            {"epoch": epoch + 1, "step": epoch * micro_steps + first + i + 1,
                             **{f"loss_{name}": value for name, value in row.items()}} for i, row in enumerate(rows)])
                images_seen += batch * ranks.world_size
                ips = images_seen / (time.perf_counter() - start)
                progress.update(task, advance=1, epoch=epoch + 1, ips=ips, loss=shown_loss)
            epochs_done = epoch + 1
            record = {"epoch": epochs_done, "lr": engine.get_lr()[0],
                      "images_per_s": images_seen / (time.perf_counter() - start),
                      **{f"loss_{name}": total / micro_steps for name, total in sums.items()}}
            value = None
            if selection.validates:
                value = validate(fp32_copy(engine.module, cfg, dataset.num_classes, device), device)
                record["val_balanced_accuracy"] = value
            selection.update(epochs_done, value)
            # Metrics first: a kill between the two leaves lines that --resume trims.
            if ranks.is_main:
                _append_jsonl(metrics_path, [record])
            save(engine, ckpt_dir, epochs_done, {"epochs_done": epochs_done, "config": config_to_dict(cfg),
                                                 "class_names": dataset.class_names,
                                                 REVISION_KEY: ARCHITECTURE_REVISION,
                                                 SELECTION_KEY: selection.summary()}, ranks,
                 keep=epoch_tag(selection.best_epoch))
            if selection.stopped_early:
                console.print(f"Stopping early after epoch {epochs_done}: no better validation balanced accuracy "
                              f"for {selection.patience} epochs (best {selection.best_value:.4f}, "
                              f"epoch {selection.best_epoch})")
                break
    model = fp32_copy(engine.module, cfg, dataset.num_classes, device)
    if selection.best_epoch != epochs_done:  # the selected epoch's weights, kept by save()
        model.load_state_dict(read_model_states(ckpt_dir / epoch_tag(selection.best_epoch))["module"])
    return model, device, selection.summary()


def train_step(engine, objective: JRCLObjective, images: torch.Tensor, labels: torch.Tensor,
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


def save(engine, ckpt_dir: Path, epochs_done: int, client_state: dict, ranks: Ranks, keep: str) -> None:
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
