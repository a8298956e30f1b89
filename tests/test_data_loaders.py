"""The loader contract (data/loader_contract.py): each loader, built from a spec alone,
is a TrainLoader or yields Batches, with the documented shapes, dtypes and lengths.
Sizes are drawn afresh each run; DALI's rows run CPU-only DALI when there is no GPU."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jrcl_fast.data.augment import AUGMENTATIONS
from jrcl_fast.data.loader_contract import Batches, LoaderSpec, TrainLoader, TrainSpec
from jrcl_fast.data.long_tailed_dataset import Split
from jrcl_fast.data.torch_loader import TorchTrainLoader, torch_eval_loader

needs_dali = pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None, reason="needs nvidia-dali")
LOADERS = ["torch", pytest.param("dali", marks=needs_dali)]


def train_loader(name: str) -> Callable[[TrainSpec], TrainLoader]:
    if name == "dali":
        from jrcl_fast.data.dali_loader import DaliTrainLoader

        return DaliTrainLoader
    return TorchTrainLoader


def eval_loader(name: str) -> Callable[[LoaderSpec], Batches]:
    if name == "dali":
        from jrcl_fast.data.dali_loader import dali_eval_loader

        return dali_eval_loader
    return torch_eval_loader


def noise_split(root: Path, rng: np.random.Generator) -> Split:
    """9-16 noise PNGs of random sizes, labelled by their index so a label names its sample."""
    n = int(rng.integers(9, 17))
    paths = [f"{i}.png" for i in range(n)]
    for path in paths:
        shape = (int(rng.integers(10, 40)), int(rng.integers(10, 40)), 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / path)
    return Split(root, paths, np.arange(n), "fixture.txt")


@pytest.mark.parametrize("name", LOADERS)
def test_a_train_loader_built_from_its_spec_keeps_the_contract(tmp_path: Path, name: str) -> None:
    rng = np.random.default_rng()
    split = noise_split(tmp_path, rng)
    batch, views, size, world = int(rng.integers(2, 4)), int(rng.integers(1, 3)), int(rng.choice([8, 12])), 2
    steps = len(split) // (batch * world)  # whole global batches: drop-last on every rank
    seen = []
    for rank in range(world):
        loader = train_loader(name)(TrainSpec(split=split, image_size=size, augmentation=AUGMENTATIONS["natural"],
                                              num_views=views, batch_size=batch, sampler="instance", seed=3,
                                              rank=rank, world_size=world))
        assert isinstance(loader, TrainLoader) and len(loader) == steps
        epoch = loader.epoch(2)
        assert isinstance(epoch, Batches)
        batches = list(epoch)
        assert len(batches) == len(epoch) == steps
        for images, labels in batches:
            assert images.shape == (batch, views, 3, size, size) and images.dtype == torch.float32
            assert labels.shape == (batch,) and labels.dtype == torch.int64
            seen += labels.tolist()
    assert len(set(seen)) == len(seen) == steps * batch * world  # instance sampling: no sample twice


@pytest.mark.parametrize("name", LOADERS)
def test_a_train_loaders_batches_do_not_depend_on_its_workers(tmp_path: Path, name: str) -> None:
    """What lets --resume change data.num_workers (run_setup.FREE_ON_RESUME): each sample's
    views come from its own seed, whichever worker or thread decodes it."""
    rng = np.random.default_rng()
    split, seed = noise_split(tmp_path, rng), int(rng.integers(1 << 30))
    epochs = []
    for workers in (0, 2):
        spec = TrainSpec(split=split, image_size=12, augmentation=AUGMENTATIONS["natural"], num_views=2, batch_size=3,
                         sampler="instance", seed=seed, workers=workers)
        batches = train_loader(name)(spec).epoch(1)
        if workers and hasattr(batches, "loader"):  # torchvision's workers: no fork after DALI's threads ran here
            batches.loader.multiprocessing_context = "spawn"
        images, labels = zip(*batches)
        epochs.append((torch.cat(images), torch.cat(labels)))
    assert torch.equal(epochs[0][0], epochs[1][0]) and torch.equal(epochs[0][1], epochs[1][1])


@pytest.mark.parametrize("name", LOADERS)
def test_an_eval_loader_built_from_its_spec_keeps_the_contract(tmp_path: Path, name: str) -> None:
    rng = np.random.default_rng()
    split = noise_split(tmp_path, rng)
    batch, size, world = int(rng.integers(2, 5)), int(rng.choice([8, 12])), 2
    seen = []
    for rank in range(world):
        batches = eval_loader(name)(LoaderSpec(split=split, image_size=size, augmentation=AUGMENTATIONS["xray"],
                                               batch_size=batch, rank=rank, world_size=world))
        assert isinstance(batches, Batches)
        for _ in range(2):  # each evaluation passes over the same loader again
            passed = list(batches)
            assert len(passed) == len(batches)
            assert all(len(labels) == batch for _, labels in passed[:-1]) and 1 <= len(passed[-1][1]) <= batch
            for images, labels in passed:
                assert images.shape == (len(labels), 3, size, size) and images.dtype == torch.float32
                assert labels.dtype == torch.int64
        seen += [v for _, labels in passed for v in labels.tolist()]
    assert sorted(seen) == list(range(len(split)))  # every sample once across ranks
