"""DALI data path: the same batches as torch_loader.py, read, decoded and augmented by DALI.

Sample order, sampling and sharding come from sampling.py alone (through the specs of
loader_contract.py): a Python feed hands this rank's file *paths* and labels, in that
order, to fn.external_source, so the torchvision and DALI paths walk the same samples,
epoch for epoch and rank for rank. DALI reads the files itself (fn.io.file.read, in its
own threads: no image byte passes through Python), decodes them ("mixed" on a GPU,
"cpu" without) and augments them with parameters from augment.py.

Why not fn.readers.file fed the epoch's file list: a reader does not stop at the end of
its list, so a pipeline built per epoch decodes and augments prefetch_queue_depth
batches that are thrown away (a third more work on an epoch of 6 batches); the feed
ends the pass exactly.

Batches keep loader_contract.py's contract, on the GPU when DALI decodes there, else on
the CPU.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.pipeline import DataNode, Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from jrcl_fast.data.augment import Augmentation, eval_resize
from jrcl_fast.data.check_data import image_problem
from jrcl_fast.data.image_formats import decode_notice
from jrcl_fast.data.loader_contract import Batch, LoaderSpec, TrainLoader, TrainSpec
from jrcl_fast.data.long_tailed_dataset import Split
from jrcl_fast.data.sampling import eval_indices
from jrcl_fast.errors import UserError

ASPECT_RATIO = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop's default
EMPTY: Mapping[str, int | float] = MappingProxyType({})


class PathFeed:
    """fn.external_source batches of (file paths as UTF-8 bytes, labels) for the split
    samples at `indices`, in order; the last batch may be short. It reads no file, and
    counts the samples it has handed out, so a failure can be traced back to files."""

    def __init__(self, split: Split, indices: np.ndarray, batch_size: int):
        self.split, self.indices, self.batch_size = split, indices, batch_size
        self.handed_out = 0

    def __iter__(self) -> PathFeed:
        self.handed_out = 0
        return self

    def __next__(self) -> tuple[list[np.ndarray], np.ndarray]:
        batch = self.indices[self.handed_out:self.handed_out + self.batch_size]
        if batch.size == 0:
            raise StopIteration
        self.handed_out += batch.size
        paths = [np.frombuffer(str(self.split.root / self.split.paths[j]).encode(), np.uint8) for j in batch]
        return paths, self.split.labels[batch]


def read_files(feed: PathFeed, gpu: bool) -> tuple[DataNode, DataNode]:
    """The feed's files, read by DALI (encoded bytes), and their labels."""
    paths, labels = fn.external_source(source=feed, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT64])
    return fn.io.file.read(paths), labels.gpu() if gpu else labels


def decode(encoded: DataNode, aug: Augmentation, gpu: bool, settings: Mapping[str, int | float] = EMPTY) -> DataNode:
    """Encoded bytes -> uint8 HWC, on the GPU ("mixed", with the data set's decoder
    `settings`: image_formats.mixed_decoder_settings) or the CPU."""
    # X-rays stay one channel through the crops and are replicated to RGB at output size.
    # EXIF orientation is ignored, as PIL's decode in the torchvision path ignores it.
    return fn.decoders.image(encoded, device="mixed" if gpu else "cpu", adjust_orientation=False,
                             output_type=types.GRAY if aug.grayscale else types.RGB, **(settings if gpu else {}))


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
def train_pipeline(feed: PathFeed, image_size: int, aug: Augmentation, num_views: int,
                   gpu: bool, decoder: Mapping[str, int | float] = EMPTY) -> tuple[DataNode, DataNode]:
    """Decode once, then num_views independent random views stacked as V x 3 x H x W."""
    encoded, labels = read_files(feed, gpu)
    images = decode(encoded, aug, gpu, decoder)
    return fn.stack(*[_train_view(images, image_size, aug) for _ in range(num_views)]), labels


def _half_to_even(d: DataNode) -> DataNode:
    """round(d / 2) with Python's round-half-to-even, for integer d >= 0."""
    k = d // 2
    return k + (d - 2 * k) * (k - 2 * (k // 2))


def _float(x: DataNode) -> DataNode:
    return fn.cast(x, dtype=types.FLOAT)


@pipeline_def(enable_conditionals=False)
def eval_pipeline(feed: PathFeed, image_size: int, aug: Augmentation, gpu: bool,
                  decoder: Mapping[str, int | float] = EMPTY) -> tuple[DataNode, DataNode]:
    """Resize the shorter side to image_size / eval_crop_fraction, centre crop.

    Sizes and crop offsets follow torchvision's integer rules exactly (long side
    truncated, offset rounded half to even) so both paths crop the same pixels;
    DALI's own resize_shorter and crop_pos 0.5 round differently by a pixel.
    """
    encoded, labels = read_files(feed, gpu)
    shape = fn.peek_image_shape(encoded, dtype=types.INT32, adjust_orientation=False)
    height, width = shape[0], shape[1]
    short, size, resize = dmath.min(height, width), image_size, eval_resize(image_size, aug)
    new_h, new_w = (resize * height) // short, (resize * width) // short
    images = fn.resize(decode(encoded, aug, gpu, decoder), resize_x=_float(new_w), resize_y=_float(new_h),
                       antialias=True)
    # crop_pos is relative: anchor = crop_pos * (extent - size), so pass offset / (extent - size).
    pos_y = _float(_half_to_even(new_h - size)) / _float(dmath.max(new_h - size, 1))
    pos_x = _float(_half_to_even(new_w - size)) / _float(dmath.max(new_w - size, 1))
    images = _normalize(_to_rgb(images, aug), aug, crop=[size, size], crop_pos_x=pos_x, crop_pos_y=pos_y)
    return images, labels


def dali_on_gpu() -> bool:
    """DALI decodes on the GPU ("mixed") when the ranks run on GPUs; CPU ranks
    (train.device=cpu, which sets DS_ACCELERATOR=cpu on a GPU machine) decode on the CPU."""
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"


# DALI names the failing operator; only the file read's and the decoders' failures are the data's fault.
DATA_FAILURE = re.compile(
    r"Error in \w+ operator `nvidia\.dali\.fn\.(io\.file\.read|decoders\.image|peek_image_shape)`"
)


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
    """Passes over the split samples at `indices`, in order, as (images, labels) torch
    tensors; each pass builds a fresh pipeline, so the object can be iterated again like
    a DataLoader. The last batch may be short. A failure to read or decode a file
    becomes a UserError naming it."""

    def __init__(self, split: Split, indices: np.ndarray, batch_size: int, build: Callable[[PathFeed], Pipeline]):
        self.split, self.indices, self.batch_size, self.build = split, indices, batch_size, build

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        if len(self.indices) == 0:  # DALI cannot start on an empty feed
            return
        feed, delivered = PathFeed(self.split, self.indices, self.batch_size), 0
        with codec_log_dropped():
            try:
                # Building the iterator already runs the first batch.
                for batch in DALIGenericIterator([self.build(feed)], ["images", "labels"], size=-1):
                    delivered += 1
                    yield batch[0]["images"], batch[0]["labels"]
            except RuntimeError as err:
                if not DATA_FAILURE.search(str(err)):
                    raise
                raise self.data_failure(delivered, feed.handed_out, str(err)) from None

    def data_failure(self, batches_delivered: int, handed_out: int, dali_error: str) -> UserError:
        """The error for a file DALI could not read or decode after `batches_delivered`
        good batches: the culprit is among the files handed out since (DALI reads ahead),
        so check those with PIL and name the first bad one as the torchvision path would;
        else name the range of entries."""
        suspects = self.indices[batches_delivered * self.batch_size:handed_out]
        for j in suspects:
            if (problem := image_problem(self.split.root / self.split.paths[j])) is not None:
                return self.split.bad_entry(int(j), problem)
        reason = dali_error.split("encountered:")[-1].strip().splitlines()[0]
        return UserError(f"{self.split.source}: DALI could not read or decode one of the images at entries "
                         f"{', '.join(str(j + 1) for j in suspects[:8])}{', ...' if len(suspects) > 8 else ''} "
                         f"({reason}); run 'jrcl-fast check-data' to list every missing or corrupt image")


def _pipeline_seed(*parts: int) -> int:
    """A distinct, reproducible DALI seed per (seed, epoch, rank)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] & 0x7FFFFFFF)


def _device_id(gpu: bool) -> int | None:
    return torch.cuda.current_device() if gpu else None


class DaliTrainLoader(TrainLoader):
    """Epoch-indexed train loader: drop-last batches of the spec's epoch_indices, so
    every rank runs len() steps per epoch."""

    def __init__(self, spec: TrainSpec):
        self.spec, self.gpu = spec, dali_on_gpu()
        if spec.rank == 0 and (notice := decode_notice(spec.split.root, spec.split.paths, self.gpu,
                                                       spec.augmentation.grayscale)):
            print(f"note: {notice}", file=sys.stderr, flush=True)  # one line: where decoding happens

    def epoch(self, epoch: int) -> DaliBatches:
        # A fresh pipeline per epoch: its feed and random seed are the epoch's, and
        # an epoch the trainer leaves early leaves nothing behind for the next.
        spec = self.spec

        def build(feed: PathFeed) -> Pipeline:
            return train_pipeline(feed, spec.image_size, spec.augmentation, spec.num_views, self.gpu, spec.decoder,
                                  batch_size=spec.batch_size, num_threads=max(1, spec.workers),
                                  device_id=_device_id(self.gpu), seed=_pipeline_seed(spec.seed, epoch, spec.rank))

        return DaliBatches(spec.split, spec.epoch_indices(epoch), spec.batch_size, build)


def dali_eval_loader(spec: LoaderSpec) -> DaliBatches:
    """Every sample of the split exactly once across ranks (eval_indices); the last batch may be short."""
    gpu = dali_on_gpu()

    def build(feed: PathFeed) -> Pipeline:
        return eval_pipeline(feed, spec.image_size, spec.augmentation, gpu, spec.decoder, batch_size=spec.batch_size,
                             num_threads=max(1, spec.workers), device_id=_device_id(gpu), seed=0)

    return DaliBatches(spec.split, eval_indices(len(spec.split), spec.rank, spec.world_size), spec.batch_size, build)
