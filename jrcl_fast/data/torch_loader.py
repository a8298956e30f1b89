"""torchvision DataLoader path: the reference data path, and the CPU default.

Train batches are (images B x V x 3 x H x W, labels B), eval batches
(images B x 3 x H x W, labels B); the DALI path yields the same.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from jrcl_fast.data.augment import Augmentation, eval_resize
from jrcl_fast.data.dataset import Split
from jrcl_fast.data.images import ImageError, load_rgb
from jrcl_fast.data.sampling import epoch_indices, eval_indices
from jrcl_fast.errors import UserError


def train_transform(image_size: int, aug: Augmentation) -> T.Compose:
    steps = [T.PILToTensor(), T.RandomResizedCrop(image_size, scale=aug.crop_scale, antialias=True)]
    if aug.flip:
        steps.append(T.RandomHorizontalFlip())
    if aug.rotation_degrees:
        steps.append(T.RandomRotation(aug.rotation_degrees))
    if aug.color_jitter:
        steps.append(T.ColorJitter(aug.color_jitter, aug.color_jitter, aug.color_jitter))
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(aug.mean, aug.std)]
    return T.Compose(steps)


def eval_transform(image_size: int, aug: Augmentation) -> T.Compose:
    return T.Compose([
        T.PILToTensor(),
        T.Resize(eval_resize(image_size, aug), antialias=True),
        T.CenterCrop(image_size),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(aug.mean, aug.std),
    ])


class Batches:
    """A DataLoader whose UserErrors keep their one-line message: from a worker
    process, the DataLoader re-raises them with the worker's traceback as the text."""

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            yield from self.loader
        except UserError as err:
            raise UserError(str(err).rsplit("UserError: ", 1)[-1].strip()) from None


class SplitDataset(Dataset):
    """Images of a split at the given indices, each as `num_views` transformed views
    drawn from its entry of `seeds` (num_views = 0: a single eval image without a view
    axis, no seeds); `grayscale` decodes to luma first (augment.py's X-ray flag)."""

    def __init__(self, split: Split, indices: np.ndarray, transform: T.Compose, num_views: int = 0,
                 seeds: np.ndarray | None = None, grayscale: bool = False):
        if num_views and (seeds is None or len(seeds) != len(indices)):
            raise ValueError("training views need one seed per sample: without them every sample would "
                             "get the same augmentation")
        self.split, self.indices, self.transform, self.num_views = split, indices, transform, num_views
        self.seeds, self.grayscale = seeds, grayscale

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        try:
            image = load_rgb(self.split.root / self.split.paths[j], self.grayscale)
        except ImageError as err:
            raise self.split.bad_entry(j, err.problem) from None
        label = int(self.split.labels[j])
        if self.num_views == 0:
            return self.transform(image), label
        # A per-item seed makes the views independent of rank count and worker order.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.seeds[i]))
            return torch.stack([self.transform(image) for _ in range(self.num_views)]), label


class TorchTrainLoader:
    """Epoch-indexed train loader: the order of epoch e depends only on (seed, e)."""

    def __init__(self, split: Split, image_size: int, aug: Augmentation, num_views: int, batch_size: int,
                 sampler: str, seed: int, num_workers: int = 0, rank: int = 0, world_size: int = 1):
        self.split, self.batch_size, self.sampler, self.seed = split, batch_size, sampler, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.transform, self.num_views, self.grayscale = train_transform(image_size, aug), num_views, aug.grayscale

    def __len__(self) -> int:
        return len(self.split) // (self.batch_size * self.world_size)

    def epoch(self, epoch: int) -> Batches:
        indices = epoch_indices(self.split.labels, self.sampler, self.seed, epoch, self.batch_size,
                                self.rank, self.world_size)
        # Seeded by the position in the global epoch order, so that N ranks x b
        # augment exactly as 1 rank x N*b does.
        b, w = self.batch_size, self.world_size
        positions = np.arange(len(indices) // b)[:, None] * (w * b) + self.rank * b + np.arange(b)
        seeds = np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0].astype(np.int64) + positions.reshape(-1)
        dataset = SplitDataset(self.split, indices, self.transform, self.num_views, seeds, self.grayscale)
        return Batches(DataLoader(dataset, batch_size=self.batch_size, shuffle=False, drop_last=True,
                                  num_workers=self.num_workers, persistent_workers=False))


def torch_eval_loader(split: Split, image_size: int, aug: Augmentation, batch_size: int, num_workers: int = 0,
                      rank: int = 0, world_size: int = 1) -> Batches:
    dataset = SplitDataset(split, eval_indices(len(split), rank, world_size), eval_transform(image_size, aug),
                           grayscale=aug.grayscale)
    return Batches(DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=num_workers))
