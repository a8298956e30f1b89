"""Loader factories: the trainer's single door into the data layer.

data.loader picks the torchvision path (torch_loader.py) or the DALI path
(dali_loader.py); both take their sample order from sampling.py and yield the
same batch shapes. Train: (B x V x 3 x H x W, B), len() steps per epoch, drop-last.
Eval: (B x 3 x H x W, B), every sample once across ranks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from jrcl_fast.config import DataConfig
from jrcl_fast.data.augment import augmentation_for
from jrcl_fast.data.dataset import LongTailedDataset, Split
from jrcl_fast.data.torch_loader import TorchTrainLoader, torch_eval_loader
from jrcl_fast.errors import UserError

if TYPE_CHECKING:
    from jrcl_fast.data.dali_loader import DaliTrainLoader


def build_train_loader(dataset: LongTailedDataset, data_cfg: DataConfig, batch_size: int, seed: int,
                       rank: int = 0, world_size: int = 1) -> TorchTrainLoader | DaliTrainLoader:
    if len(dataset.train) < batch_size * world_size:
        raise UserError(
            f"train.batch_size {batch_size} x {world_size} rank(s) exceeds the {len(dataset.train)} training "
            f"images of {dataset.name}; lower train.batch_size"
        )
    args = (dataset.train, data_cfg.image_size, augmentation_for(dataset.name), data_cfg.num_views,
            batch_size, data_cfg.sampler, seed, data_cfg.num_workers, rank, world_size)
    if data_cfg.loader == "dali":
        from jrcl_fast.data.dali_loader import DaliTrainLoader  # DALI loads only when asked for

        return DaliTrainLoader(*args)
    return TorchTrainLoader(*args)


def build_eval_loader(split: Split, dataset_name: str, data_cfg: DataConfig, batch_size: int,
                      rank: int = 0, world_size: int = 1) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    args = (split, data_cfg.image_size, augmentation_for(dataset_name), batch_size, data_cfg.num_workers,
            rank, world_size)
    if data_cfg.loader == "dali":
        from jrcl_fast.data.dali_loader import dali_eval_loader

        return dali_eval_loader(*args)
    return torch_eval_loader(*args)
