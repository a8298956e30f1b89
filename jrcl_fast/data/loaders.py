"""Loader factories: the trainer's single door into the data layer."""

from __future__ import annotations

from jrcl_fast.config import DataConfig
from jrcl_fast.data.augment import augmentation_for
from jrcl_fast.data.dataset import LongTailedDataset, Split
from jrcl_fast.data.torch_loader import TorchTrainLoader, torch_eval_loader
from jrcl_fast.errors import UserError


def build_train_loader(dataset: LongTailedDataset, data_cfg: DataConfig, batch_size: int, seed: int,
                       rank: int = 0, world_size: int = 1) -> TorchTrainLoader:
    if len(dataset.train) < batch_size * world_size:
        raise UserError(
            f"train.batch_size {batch_size} x {world_size} rank(s) exceeds the {len(dataset.train)} training "
            f"images of {dataset.name}; lower train.batch_size"
        )
    return TorchTrainLoader(dataset.train, data_cfg.image_size, augmentation_for(dataset.name), data_cfg.num_views,
                            batch_size, data_cfg.sampler, seed, data_cfg.num_workers, rank, world_size)


def build_eval_loader(split: Split, dataset_name: str, data_cfg: DataConfig, batch_size: int,
                      rank: int = 0, world_size: int = 1):
    return torch_eval_loader(split, data_cfg.image_size, augmentation_for(dataset_name), batch_size,
                             data_cfg.num_workers, rank, world_size)
