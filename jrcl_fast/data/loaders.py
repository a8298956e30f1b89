"""Loader factories: the trainer's and the evaluator's single door into the data layer.

Each factory builds the spec of loader_contract.py once from the config, and data.loader
picks the path that reads it: torchvision (torch_loader.py) or DALI (dali_loader.py).
Both keep the contract written there.
"""

from __future__ import annotations

from jrcl_fast.config import DataConfig
from jrcl_fast.cores import workers_per_rank
from jrcl_fast.data.augment import augmentation_for
from jrcl_fast.data.image_formats import mixed_decoder_settings
from jrcl_fast.data.loader_contract import Batches, LoaderSpec, TrainLoader, TrainSpec
from jrcl_fast.data.long_tailed_dataset import LongTailedDataset, Split
from jrcl_fast.data.torch_loader import TorchTrainLoader, torch_eval_loader
from jrcl_fast.errors import UserError


def build_train_loader(dataset: LongTailedDataset, data_cfg: DataConfig, batch_size: int, seed: int,
                       rank: int = 0, world_size: int = 1) -> TrainLoader:
    if len(dataset.train) < batch_size * world_size:
        raise UserError(
            f"train.batch_size {batch_size} x {world_size} rank(s) exceeds the {len(dataset.train)} training "
            f"images of {dataset.name}; lower train.batch_size"
        )
    spec = TrainSpec(split=dataset.train, image_size=data_cfg.image_size, augmentation=augmentation_for(dataset.name),
                     batch_size=batch_size, workers=workers_per_rank(data_cfg.num_workers)[0], rank=rank,
                     world_size=world_size,
                     num_views=data_cfg.num_views, sampler=data_cfg.sampler, seed=seed,
                     decoder=mixed_decoder_settings(dataset.name, data_cfg.decoder))
    if data_cfg.loader == "dali":
        from jrcl_fast.data.dali_loader import DaliTrainLoader  # DALI loads only when asked for

        return DaliTrainLoader(spec)
    return TorchTrainLoader(spec)


def build_eval_loader(split: Split, dataset_name: str, data_cfg: DataConfig, batch_size: int,
                      rank: int = 0, world_size: int = 1) -> Batches:
    spec = LoaderSpec(split=split, image_size=data_cfg.image_size, augmentation=augmentation_for(dataset_name),
                      batch_size=batch_size, workers=workers_per_rank(data_cfg.num_workers)[0], rank=rank,
                     world_size=world_size,
                      decoder=mixed_decoder_settings(dataset_name, data_cfg.decoder))
    if data_cfg.loader == "dali":
        from jrcl_fast.data.dali_loader import dali_eval_loader

        return dali_eval_loader(spec)
    return torch_eval_loader(spec)
