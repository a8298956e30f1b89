"""torchvision DataLoader path: the reference data path, and the CPU default.

Built from the specs of loader_contract.py and keeping its contract, as the DALI path does.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from jrcl_fast.data.augment import Augmentation, eval_resize
from jrcl_fast.data.images import ImageError, load_rgb
from jrcl_fast.data.loader_contract import Batch, LoaderSpec, TrainLoader, TrainSpec
from jrcl_fast.data.long_tailed_dataset import Split
from jrcl_fast.data.sampling import eval_indices
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


class DataLoaderBatches:
    """A DataLoader whose UserErrors keep their one-line message: from a worker
    process, the DataLoader re-raises them with the worker's traceback as the text."""

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
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


class TorchTrainLoader(TrainLoader):
    """Epoch-indexed train loader: the order of epoch e depends only on (seed, e)."""

    def __init__(self, spec: TrainSpec):
        self.spec = spec
        self.transform = train_transform(spec.image_size, spec.augmentation)

    def epoch(self, epoch: int) -> DataLoaderBatches:
        spec = self.spec
        indices = spec.epoch_indices(epoch)
        # Seeded by the position in the global epoch order, so that N ranks x b
        # augment exactly as 1 rank x N*b does.
        b, w = spec.batch_size, spec.world_size
        positions = np.arange(len(indices) // b)[:, None] * (w * b) + spec.rank * b + np.arange(b)
        seeds = np.random.SeedSequence([spec.seed, epoch]).generate_state(1)[0].astype(np.int64) + positions.reshape(-1)
        dataset = SplitDataset(spec.split, indices, self.transform, spec.num_views, seeds,
                               spec.augmentation.grayscale)
        return DataLoaderBatches(DataLoader(dataset, batch_size=b, shuffle=False, drop_last=True,
                                            num_workers=spec.workers, persistent_workers=False))


def torch_eval_loader(spec: LoaderSpec) -> DataLoaderBatches:
    dataset = SplitDataset(spec.split, eval_indices(len(spec.split), spec.rank, spec.world_size),
                           eval_transform(spec.image_size, spec.augmentation), grayscale=spec.augmentation.grayscale)
    return DataLoaderBatches(DataLoader(dataset, batch_size=spec.batch_size, shuffle=False, drop_last=False,
                                        num_workers=spec.workers))
