"""The training loop: epochs of JRCL steps, per-epoch metrics and checkpoints.

Resuming is exact on the CPU: the sample order and the augmentation randomness of an
epoch depend only on (seed, epoch), and a checkpoint is written after every epoch, so
a run killed anywhere and resumed repeats the interrupted epoch bit for bit.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from jrcl_fast.atomic import atomic_write_bytes
from jrcl_fast.config import Config, config_to_dict
from jrcl_fast.data.dataset import LongTailedDataset
from jrcl_fast.data.groups import normal_class_mask
from jrcl_fast.data.loaders import build_train_loader
from jrcl_fast.engine.checkpoint import load_checkpoint, save_checkpoint
from jrcl_fast.engine.optim import build_optimizer, build_scheduler
from jrcl_fast.errors import UserError
from jrcl_fast.losses.objective import JRCLObjective
from jrcl_fast.models import JRCLNet

CHECKPOINT_NAME = "last.pt"
METRICS_NAME = "metrics.jsonl"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_epoch(seed: int, epoch: int) -> None:
    """Augmentations draw from torch's global generator: fix it per epoch."""
    torch.manual_seed(seed * 1_000_003 + epoch)


@dataclass
class TrainState:
    model: JRCLNet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    epochs_done: int = 0


def checkpoint_payload(state: TrainState, cfg: Config, dataset: LongTailedDataset) -> dict:
    """Everything `jrcl-fast eval` and `--resume` need, the config included."""
    return {
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "epochs_done": state.epochs_done,
        "config": config_to_dict(cfg),
        "class_names": dataset.class_names,
    }


def _trim_metrics(path: Path, epochs_done: int) -> None:
    """Drop metric lines of epochs after the checkpoint: they will be run again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["epoch"] <= epochs_done]
    atomic_write_bytes(path, lambda f: f.write("".join(f"{line}\n" for line in kept).encode()))


def _append_metrics(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[ips]:>6.0f} img/s"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def train(cfg: Config, dataset: LongTailedDataset, resume: bool, overwrite: bool, console: Console) -> JRCLNet:
    """Train `cfg` on `dataset`; returns the trained model (checkpoint in train.output_dir)."""
    out_dir = Path(cfg.train.output_dir)
    ckpt_path, metrics_path = out_dir / CHECKPOINT_NAME, out_dir / METRICS_NAME
    if ckpt_path.exists() and not (resume or overwrite):
        raise UserError(f"train.output_dir {out_dir} already holds a run; pass --resume to continue it, "
                        "--overwrite to start over, or set another train.output_dir")
    if resume and not ckpt_path.exists():
        raise UserError(f"--resume: {ckpt_path} does not exist; start without --resume")
    dataset.train.check_files_exist()
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = default_device()

    torch.manual_seed(cfg.train.seed)
    model = JRCLNet(cfg.model, dataset.num_classes).to(device)
    loader = build_train_loader(dataset, cfg.data, cfg.train.batch_size, cfg.train.seed)
    optimizer = build_optimizer(cfg.optim, model)
    state = TrainState(model, optimizer, build_scheduler(cfg.optim, optimizer, len(loader), cfg.train.epochs))
    objective = JRCLObjective(cfg.loss, dataset.train_counts, normal_class_mask(dataset, cfg.data), device)

    if resume:
        saved = load_checkpoint(ckpt_path)
        if saved["config"] != config_to_dict(cfg):
            raise UserError(f"--resume: the config differs from the one {ckpt_path} was trained with; "
                            "resume with the same config and --set overrides")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state.scheduler.load_state_dict(saved["scheduler"])
        state.epochs_done = saved["epochs_done"]
        console.print(f"Resuming {out_dir} after epoch {state.epochs_done}")
        _trim_metrics(metrics_path, state.epochs_done)
    else:
        metrics_path.unlink(missing_ok=True)

    views = cfg.data.num_views
    with _progress(console) as progress:
        task = progress.add_task("train", total=len(loader) * cfg.train.epochs,
                                 completed=len(loader) * state.epochs_done, epoch=state.epochs_done + 1, ips=0.0,
                                 loss=float("nan"))
        for epoch in range(state.epochs_done, cfg.train.epochs):
            model.train()
            seed_epoch(cfg.train.seed, epoch)
            sums: dict[str, float] = {}
            images_seen, start = 0, time.perf_counter()
            for images, labels in loader.epoch(epoch):
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                batch = labels.shape[0]
                # View-major rows: [view 0 of every image; view 1; ...] in one backbone pass.
                out = model(images.transpose(0, 1).reshape(views * batch, *images.shape[2:]))
                loss, terms = objective(out.logits, out.binary_logits, out.features, labels, views,
                                        model.normalized_prototypes())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                state.scheduler.step()
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + float(value)
                images_seen += batch
                ips = images_seen / (time.perf_counter() - start)
                progress.update(task, advance=1, epoch=epoch + 1, ips=ips, loss=float(terms["total"]))
            if not np.isfinite(sums.get("total", 0.0)):
                raise RuntimeError(f"the training loss became non-finite in epoch {epoch + 1}; lower optim.lr")
            state.epochs_done = epoch + 1
            steps = len(loader)
            record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                      "images_per_s": images_seen / (time.perf_counter() - start),
                      **{f"loss_{name}": total / steps for name, total in sums.items()}}
            # Metrics first: a kill between the two leaves a line that --resume trims.
            _append_metrics(metrics_path, record)
            save_checkpoint(ckpt_path, checkpoint_payload(state, cfg, dataset))
    return model
