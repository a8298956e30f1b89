"""The contract every loader keeps: what it is built from (a spec) and what it yields.

loaders.py builds a spec once from the config and hands it to the torchvision path
(torch_loader.py) or the DALI path (dali_loader.py). Both take their sample order from
the spec, which takes it from sampling.py, so they walk the same samples epoch for
epoch and rank for rank.

Train: `loader.epoch(e)` is one epoch of (images B x V x 3 x H x W float32, labels B
int64), drop-last, len(loader) steps on every rank. Eval: one pass of (images
B x 3 x H x W float32, labels B int64) that can be iterated again; every sample once
across ranks, the last batch may be short.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from jrcl_fast.data.augment import Augmentation
from jrcl_fast.data.long_tailed_dataset import Split
from jrcl_fast.data.sampling import epoch_indices

Batch = tuple[torch.Tensor, torch.Tensor]  # images, labels


@dataclass(frozen=True, kw_only=True)
class LoaderSpec:
    """What any loader reads and how: an eval loader needs no more."""

    split: Split
    image_size: int
    augmentation: Augmentation
    batch_size: int
    workers: int = 0  # DataLoader worker processes; DALI CPU threads (at least 1)
    rank: int = 0
    world_size: int = 1
    # fn.decoders.image settings of a GPU (mixed) decode: image_formats.mixed_decoder_settings.
    decoder: dict[str, int | float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class TrainSpec(LoaderSpec):
    """A train loader's spec: the views per image and the epoch's sampling besides."""

    num_views: int
    sampler: str  # sampling.py's mode: instance | class_balanced | sqrt
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        """Whole global batches of world_size x batch_size, the same on every rank."""
        return len(self.split) // (self.batch_size * self.world_size)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's split indices of one epoch, in order, steps_per_epoch batches of them."""
        return epoch_indices(self.split.labels, self.sampler, self.seed, epoch, self.batch_size,
                             self.rank, self.world_size)


@runtime_checkable
class Batches(Protocol):
    """One pass over a loader's batches; len() is the number of batches it yields."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Batch]: ...


@runtime_checkable
class TrainLoader(Protocol):
    """An epoch-indexed train loader: epoch e's batches depend only on (spec, e), so a
    resumed run sees the epochs it would have seen."""

    spec: TrainSpec

    def __len__(self) -> int:
        return self.spec.steps_per_epoch

    @abstractmethod
    def epoch(self, epoch: int) -> Batches: ...
