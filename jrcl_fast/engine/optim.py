"""Optimizer and learning-rate schedule: linear warmup, then cosine decay, per step.

Optimizers are entries of the OPTIMIZERS registry (optim.name): a builder from the
parameter groups and the OptimConfig to a torch optimizer."""

from __future__ import annotations

import math

import torch
from torch import nn

from jrcl_fast.config import OptimConfig
from jrcl_fast.registry import OPTIMIZERS

ParamGroups = list[dict]


def sgd(groups: ParamGroups, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def adamw(groups: ParamGroups, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr)  # its default betas; optim.momentum is SGD's


OPTIMIZERS.register("sgd", sgd)
OPTIMIZERS.register("adamw", adamw)


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    # No weight decay on biases, norm parameters or the prototypes: decaying them
    # only shrinks scales the loss normalises away. Frozen parameters (train.trainable) stay out.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or name == "prototypes" else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return OPTIMIZERS.get(cfg.name)(groups, cfg)


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the base learning rate at a step (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    total, warmup = steps_per_epoch * epochs, steps_per_epoch * cfg.warmup_epochs
    min_ratio = cfg.min_lr / cfg.lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, min_ratio))
