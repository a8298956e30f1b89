"""DALI data path: the same batches as torch_loader.py, decoded and augmented by DALI.

Sample order, sampling and sharding come from sampling.py alone: a Python feed reads
the encoded bytes of this rank's indices, in order, into fn.external_source, and DALI
decodes ("mixed" on a GPU, "cpu" without) and augments. So the torchvision and DALI
paths walk the same samples, epoch for epoch and rank for rank. Transform parameters
come from augment.py.

Train batches are (images B x V x 3 x H x W float32, labels B int64) and eval batches
(images B x 3 x H x W, labels B), on the GPU when DALI decodes there, else on the CPU.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.pipeline import DataNode, Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from jrcl_fast.data.augment import Augmentation, eval_resize
from jrcl_fast.data.check_data import image_problem
from jrcl_fast.data.dataset import MISSING, Split
from jrcl_fast.data.sampling import epoch_indices, eval_indices
from jrcl_fast.errors import UserError

ASPECT_RATIO = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop's default


class EncodedFeed:
    """fn.external_source batches of (encoded file bytes, labels) for split samples at
    `indices`, in order; the last batch may be short. It remembers the batches it has
    fed, so a decode failure can be traced back to files."""

    def __init__(self, split: Split, indices: np.ndarray, batch_size: int):
        self.split, self.indices, self.batch_size = split, indices, batch_size
        self._pos = 0

    def __iter__(self) -> EncodedFeed:
        self._pos = 0
        return self

    def __next__(self) -> tuple[list[np.ndarray], np.ndarray]:
        batch = self.indices[self._pos:self._pos + self.batch_size]
        if batch.size == 0:
            raise StopIteration
        self._pos += batch.size
        encoded = []
        for j in batch:
            path = self.split.root / self.split.paths[j]
            if not path.is_file():
                raise self.split.bad_entry(int(j), MISSING)
            encoded.append(np.fromfile(path, dtype=np.uint8))
        return encoded, self.split.labels[batch]

    def decode_failure(self, batches_delivered: int, dali_error: str) -> UserError:
        """The error for a decode failure after `batches_delivered` good batches: the
        culprit is among the batches fed since (DALI reads ahead), so decode those with
        PIL and name the first bad file as the torchvision path would; else name the
        range of entries."""
        suspects = self.indices[batches_delivered * self.batch_size:self._pos]
        for j in suspects:
            if (problem := image_problem(self.split.root / self.split.paths[j])) is not None:
                return self.split.bad_entry(int(j), problem)
        reason = dali_error.split("encountered:")[-1].strip().splitlines()[0]
        return UserError(f"{self.split.source}: DALI could not decode one of the images at entries "
                         f"{', '.join(str(j + 1) for j in suspects[:8])}{', ...' if len(suspects) > 8 else ''} "
                         f"({reason}); run 'jrcl-fast check-data' to list every missing or corrupt image")


def _read(feed: EncodedFeed, gpu: bool) -> tuple[DataNode, DataNode]:
    encoded, labels = fn.external_source(source=feed, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT64])
    return encoded, labels.gpu() if gpu else labels


def decode(encoded: DataNode, aug: Augmentation, gpu: bool) -> DataNode:
    """Encoded bytes -> uint8 HWC, on the GPU ("mixed") or the CPU."""
    # X-rays stay one channel through the crops and are replicated to RGB at output size.
    # EXIF orientation is ignored, as PIL's decode in the torchvision path ignores it.
    return fn.decoders.image(encoded, device="mixed" if gpu else "cpu", adjust_orientation=False,
                             output_type=types.GRAY if aug.grayscale else types.RGB)


def _to_rgb(images: DataNode, aug: Augmentation) -> DataNode:
    return fn.cat(images, images, images, axis=2) if aug.grayscale else images


def _normalize(images: DataNode, aug: Augmentation, **crop_mirror: object) -> DataNode:
    """uint8 HWC -> normalised float CHW, as ToDtype(scale=True) then Normalize."""
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                    mean=[255.0 * m for m in aug.mean], std=[255.0 * s for s in aug.std],
                                    **crop_mirror)


def view_steps(image_size: int, aug: Augmentation) -> list[tuple[str, Callable[[DataNode], DataNode]]]:
    """One random training view as named steps, in torchvision's order (train_transform):
    resized crop, rotation, colour jitter, then flip with normalisation. Each call of a
    step draws fresh random parameters. Named so benchmarks/bench_data.py can time them."""
    def resized_crop(images: DataNode) -> DataNode:
        return fn.random_resized_crop(images, size=[image_size, image_size], random_area=list(aug.crop_scale),
                                      random_aspect_ratio=list(ASPECT_RATIO), antialias=True)

    def rotation(view: DataNode) -> DataNode:
        angle = fn.random.uniform(range=[-aug.rotation_degrees, aug.rotation_degrees])
        # Nearest neighbour, as torchvision's RandomRotation defaults to.
        return fn.rotate(view, angle=angle, keep_size=True, fill_value=0, interp_type=types.INTERP_NN)

    def to_rgb(view: DataNode) -> DataNode:
        return _to_rgb(view, aug)

    def color_jitter(view: DataNode) -> DataNode:
        low, high = 1.0 - aug.color_jitter, 1.0 + aug.color_jitter
        return fn.color_twist(view, brightness=fn.random.uniform(range=[low, high]),
                              contrast=fn.random.uniform(range=[low, high]),
                              saturation=fn.random.uniform(range=[low, high]))

    def flip_normalize(view: DataNode) -> DataNode:
        return _normalize(view, aug, mirror=fn.random.coin_flip(probability=0.5) if aug.flip else 0)

    steps = [("fn.random_resized_crop", resized_crop)]
    if aug.rotation_degrees:
        steps.append(("fn.rotate", rotation))
    if aug.grayscale:
        steps.append(("fn.cat (gray to RGB)", to_rgb))
    if aug.color_jitter:
        steps.append(("fn.color_twist", color_jitter))
    return steps + [("fn.crop_mirror_normalize", flip_normalize)]


def _train_view(images: DataNode, image_size: int, aug: Augmentation) -> DataNode:
    for _, step in view_steps(image_size, aug):
        images = step(images)
    return images


@pipeline_def(enable_conditionals=False)
def train_pipeline(feed: EncodedFeed, image_size: int, aug: Augmentation, num_views: int,
                   gpu: bool) -> tuple[DataNode, DataNode]:
    """Decode once, then num_views independent random views stacked as V x 3 x H x W."""
    encoded, labels = _read(feed, gpu)
    images = decode(encoded, aug, gpu)
    return fn.stack(*[_train_view(images, image_size, aug) for _ in range(num_views)]), labels


def _half_to_even(d: DataNode) -> DataNode:
    """round(d / 2) with Python's round-half-to-even, for integer d >= 0."""
    k = d // 2
    return k + (d - 2 * k) * (k - 2 * (k // 2))


def _float(x: DataNode) -> DataNode:
    return fn.cast(x, dtype=types.FLOAT)


@pipeline_def(enable_conditionals=False)
def eval_pipeline(feed: EncodedFeed, image_size: int, aug: Augmentation, gpu: bool) -> tuple[DataNode, DataNode]:
    """Resize the shorter side to image_size / eval_crop_fraction, centre crop.

    Sizes and crop offsets follow torchvision's integer rules exactly (long side
    truncated, offset rounded half to even) so both paths crop the same pixels;
    DALI's own resize_shorter and crop_pos 0.5 round differently by a pixel.
    """
    encoded, labels = _read(feed, gpu)
    shape = fn.peek_image_shape(encoded, dtype=types.INT32, adjust_orientation=False)
    height, width = shape[0], shape[1]
    short, size, resize = dmath.min(height, width), image_size, eval_resize(image_size, aug)
    new_h, new_w = (resize * height) // short, (resize * width) // short
    images = fn.resize(decode(encoded, aug, gpu), resize_x=_float(new_w), resize_y=_float(new_h), antialias=True)
    # crop_pos is relative: anchor = crop_pos * (extent - size), so pass offset / (extent - size).
    pos_y = _float(_half_to_even(new_h - size)) / _float(dmath.max(new_h - size, 1))
    pos_x = _float(_half_to_even(new_w - size)) / _float(dmath.max(new_w - size, 1))
    images = _normalize(_to_rgb(images, aug), aug, crop=[size, size], crop_pos_x=pos_x, crop_pos_y=pos_y)
    return images, labels


def dali_on_gpu() -> bool:
    """DALI decodes on the GPU ("mixed") when the ranks run on GPUs; CPU ranks
    (train.device=cpu, which sets DS_ACCELERATOR=cpu on a GPU machine) decode on the CPU."""
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"


# DALI names the failing operator; only the decoders' failures are the data's fault.
DECODE_FAILURE = re.compile(r"Error in \w+ operator `nvidia\.dali\.fn\.(decoders\.image|peek_image_shape)`")


# nvImageCodec writes each undecodable file to fd 2 itself, in colour ("[ERROR] [jpeg_parser]
# Invalid marker"), before DALI raises; DALI_NVIMGCODEC_LOG_LEVEL cannot go below errors.
# DaliBatches turns the failure into one UserError, so those lines are dropped.
CODEC_LOG_LINE = re.compile(rb"^(\x1b\[[0-9;]*m)?\[(ERROR|WARNING)\] (\x1b\[[0-9;]*m)?\[[\w-]+\] ")


@contextmanager
def codec_log_dropped() -> Iterator[None]:
    """Route fd 2 through a pipe whose reader forwards every line except nvImageCodec's."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not CODEC_LOG_LINE.match(line):
                    while line:
                        line = line[os.write(saved, line):]

    thread = threading.Thread(target=forward, name="codec-log-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the reader sees EOF and drains
        thread.join(timeout=10)
        os.close(saved)


class DaliBatches:
    """Passes over a pipeline as (images, labels) torch tensors; each pass builds a
    fresh feed and pipeline, so the object can be iterated again like a DataLoader.
    A decode failure becomes a UserError naming the bad file."""

    def __init__(self, split: Split, indices: np.ndarray, batch_size: int,
                 build: Callable[[EncodedFeed], Pipeline], num_batches: int):
        self.split, self.indices, self.batch_size = split, indices, batch_size
        self.build, self.num_batches = build, num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.num_batches == 0:  # DALI cannot start on an empty feed
            return
        feed, delivered = EncodedFeed(self.split, self.indices, self.batch_size), 0
        with codec_log_dropped():
            try:
                # Building the iterator already runs the first batch.
                for batch in DALIGenericIterator([self.build(feed)], ["images", "labels"], size=-1):
                    delivered += 1
                    yield batch[0]["images"], batch[0]["labels"]
            except RuntimeError as err:
                if not DECODE_FAILURE.search(str(err)):
                    raise
                raise feed.decode_failure(delivered, str(err)) from None


def _pipeline_seed(*parts: int) -> int:
    """A distinct, reproducible DALI seed per (seed, epoch, rank)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] & 0x7FFFFFFF)


def _device_id(gpu: bool) -> int | None:
    return torch.cuda.current_device() if gpu else None


class DaliTrainLoader:
    """Epoch-indexed train loader with the contract of TorchTrainLoader: drop-last
    batches from epoch_indices, so every rank runs len() steps per epoch."""

    def __init__(self, split: Split, image_size: int, aug: Augmentation, num_views: int, batch_size: int,
                 sampler: str, seed: int, num_threads: int = 1, rank: int = 0, world_size: int = 1):
        self.split, self.image_size, self.aug, self.num_views = split, image_size, aug, num_views
        self.batch_size, self.sampler, self.seed = batch_size, sampler, seed
        self.num_threads, self.rank, self.world_size = max(1, num_threads), rank, world_size
        self.gpu = dali_on_gpu()

    def __len__(self) -> int:
        return len(self.split) // (self.batch_size * self.world_size)

    def epoch(self, epoch: int) -> DaliBatches:
        # A fresh pipeline per epoch: its feed and random seed are the epoch's, and an
        # epoch the trainer leaves early leaves nothing behind for the next.
        indices = epoch_indices(self.split.labels, self.sampler, self.seed, epoch, self.batch_size,
                                self.rank, self.world_size)

        def build(feed: EncodedFeed) -> Pipeline:
            return train_pipeline(feed, self.image_size, self.aug, self.num_views, self.gpu,
                                  batch_size=self.batch_size, num_threads=self.num_threads,
                                  device_id=_device_id(self.gpu), seed=_pipeline_seed(self.seed, epoch, self.rank))

        return DaliBatches(self.split, indices, self.batch_size, build, len(indices) // self.batch_size)


def dali_eval_loader(split: Split, image_size: int, aug: Augmentation, batch_size: int, num_threads: int = 1,
                     rank: int = 0, world_size: int = 1) -> DaliBatches:
    """Every sample of the split exactly once across ranks (eval_indices); the last batch may be short."""
    indices = eval_indices(len(split), rank, world_size)
    gpu = dali_on_gpu()

    def build(feed: EncodedFeed) -> Pipeline:
        return eval_pipeline(feed, image_size, aug, gpu, batch_size=batch_size, num_threads=max(1, num_threads),
                             device_id=_device_id(gpu), seed=0)

    return DaliBatches(split, indices, batch_size, build, -(-len(indices) // batch_size))
