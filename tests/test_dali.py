"""The DALI path against the torchvision reference: same samples, same eval pixels,
same batch contract, sharding without overlap. Runs CPU-only DALI when there is no GPU."""

from __future__ import annotations

import builtins
import io
import os
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from nvidia.dali import fn, pipeline_def  # noqa: E402
from nvidia.dali.pipeline import DataNode  # noqa: E402
from test_data_adapters import gradient  # noqa: E402

from jrcl_fast.config import DataConfig  # noqa: E402
from jrcl_fast.data import dali_loader  # noqa: E402
from jrcl_fast.data.augment import AUGMENTATIONS  # noqa: E402
from jrcl_fast.data.dali_loader import (  # noqa: E402
    DaliBatches,
    DaliTrainLoader,
    PathFeed,
    codec_log_dropped,
    dali_eval_loader,
    read_files,
)
from jrcl_fast.data.loader_contract import LoaderSpec, TrainSpec  # noqa: E402
from jrcl_fast.data.loaders import build_eval_loader, build_train_loader  # noqa: E402
from jrcl_fast.data.long_tailed_dataset import LongTailedDataset, Split  # noqa: E402
from jrcl_fast.data.sampling import epoch_indices  # noqa: E402
from jrcl_fast.data.torch_loader import TorchTrainLoader, torch_eval_loader  # noqa: E402
from jrcl_fast.errors import UserError  # noqa: E402

SIZES = [(60, 80), (80, 60), (37, 91), (64, 64), (128, 200), (300, 257), (45, 45)]
NATURAL, XRAY = AUGMENTATIONS["natural"], AUGMENTATIONS["xray"]


def make_split(root: Path, n: int, ext: str = "png", mode: str = "RGB", labels: np.ndarray | None = None) -> Split:
    """n images of varied sizes; labels default to the sample index, so a label names its sample."""
    paths = []
    for i in range(n):
        height, width = SIZES[i % len(SIZES)]
        pixels = gradient(height, width, 1 if mode in ("L", "I;16") else 3)
        if mode == "RGBA":  # an opaque alpha plane: both paths drop it
            pixels = np.dstack([pixels, np.full((height, width), 255, np.uint8)])
        image = Image.fromarray(pixels.astype(np.uint16) * 257) if mode == "I;16" else Image.fromarray(pixels, mode)
        paths.append(f"{mode.replace(';', '')}_{i}.{ext}")
        image.save(root / paths[-1], **({"quality": 95} if ext == "jpg" else {}))
    return Split(root, paths, np.arange(n) if labels is None else labels, "fixture.txt")


def train_spec(split: Split, image_size: int, aug, num_views: int, batch_size: int, sampler: str = "instance",
               seed: int = 0, rank: int = 0, world_size: int = 1) -> TrainSpec:
    return TrainSpec(split=split, image_size=image_size, augmentation=aug, num_views=num_views, batch_size=batch_size,
                     sampler=sampler, seed=seed, rank=rank, world_size=world_size)


def collect(batches) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*[(x.cpu().clone(), y.cpu().clone()) for x, y in batches])
    return torch.cat(images), torch.cat(labels)


@pytest.mark.parametrize("ext, mode, aug, max_levels, mean_levels", [
    ("png", "RGB", NATURAL, 1, 0.25),  # same pixels, same crop window; resamplers round apart by <= 1 level
    ("jpg", "RGB", NATURAL, 2, 0.25),  # two JPEG decoders on top
    ("png", "L", XRAY, 1, 0.25),
    ("png", "I;16", XRAY, 1, 0.25),  # 16-bit rescaled to 8 bit by both
    # A colour X-ray file: both reduce it to luma; their conversions round apart by half a level on average.
    ("png", "RGB", XRAY, 2, 0.75),
    ("png", "RGBA", XRAY, 2, 0.75),
])
def test_eval_matches_torchvision(tmp_path: Path, ext: str, mode: str, aug, max_levels: int,
                                  mean_levels: float) -> None:
    split = make_split(tmp_path, 9, ext, mode)
    spec = LoaderSpec(split=split, image_size=32, augmentation=aug, batch_size=4)
    dali_images, dali_labels = collect(dali_eval_loader(spec))
    torch_images, torch_labels = collect(torch_eval_loader(spec))
    assert dali_images.shape == torch_images.shape == (9, 3, 32, 32) and dali_images.dtype == torch.float32
    assert torch.equal(dali_labels, torch_labels)
    # In 8-bit grey levels: normalised differences times std times 255.
    levels = (dali_images - torch_images).abs() * torch.tensor(aug.std).view(3, 1, 1) * 255
    assert levels.max().item() <= max_levels + 1e-3 and levels.mean().item() < mean_levels


def test_eval_sees_every_sample_once_across_ranks_and_passes(tmp_path: Path) -> None:
    split = make_split(tmp_path, 23)
    seen = []
    for rank in range(2):
        loader = dali_eval_loader(LoaderSpec(split=split, image_size=16, augmentation=NATURAL, batch_size=5, rank=rank,
                                             world_size=2))
        for _ in range(2):  # a second pass over the same loader, as each eval epoch makes
            _, labels = collect(loader)
            assert len(loader) == 3 and len(labels) == (12, 11)[rank]
        seen += labels.tolist()
    assert sorted(seen) == list(range(23))


@pytest.mark.parametrize("sampler", ["instance", "class_balanced", "sqrt"])
def test_train_walks_the_samples_of_sampling_py_like_torch(tmp_path: Path, sampler: str) -> None:
    labels = np.array([0] * 12 + [1] * 5 + [2] * 2)
    split = make_split(tmp_path, len(labels), labels=labels)
    for rank in range(2):
        spec = train_spec(split, 16, NATURAL, 2, batch_size=3, sampler=sampler, seed=5, rank=rank, world_size=2)
        dali, ref = DaliTrainLoader(spec), TorchTrainLoader(spec)
        assert len(dali) == len(ref) == 3
        images, dali_labels = collect(dali.epoch(4))
        expected = labels[epoch_indices(labels, sampler, 5, 4, 3, rank, 2)]
        assert dali_labels.tolist() == expected.tolist() == collect(ref.epoch(4))[1].tolist()
        assert images.shape == (9, 2, 3, 16, 16)


def test_train_shards_cover_the_epoch_without_overlap(tmp_path: Path) -> None:
    split = make_split(tmp_path, 17)  # 17 = 2 global batches of 2 x 4, and one left over
    shards = []
    for rank in range(2):
        loader = DaliTrainLoader(train_spec(split, 16, NATURAL, 1, batch_size=4, rank=rank, world_size=2))
        batches = list(loader.epoch(0))
        assert len(batches) == len(loader) == 2 and all(len(y) == 4 for _, y in batches)  # drop-last
        shards.append({int(v) for _, y in batches for v in y})
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 16
    whole = DaliTrainLoader(train_spec(split, 16, NATURAL, 1, batch_size=8))
    assert shards[0] | shards[1] == set(collect(whole.epoch(0))[1].tolist())


def test_train_views_are_independent_and_epochs_differ(tmp_path: Path) -> None:
    split = make_split(tmp_path, 8, "png", "L")
    loader = DaliTrainLoader(train_spec(split, 24, XRAY, 3, batch_size=4, seed=1))
    images, _ = collect(loader.epoch(0))
    assert images.shape == (8, 3, 3, 24, 24) and torch.isfinite(images).all()
    assert torch.equal(images[:, :, 0], images[:, :, 1])  # grayscale replicated to 3 channels
    assert not torch.equal(images[:, 0], images[:, 1])  # views are separate random draws
    assert torch.equal(images, collect(loader.epoch(0))[0])  # an epoch is reproducible
    # Another epoch augments each sample afresh (labels name samples here).
    next_images, next_labels = collect(loader.epoch(1))
    by_sample, next_by_sample = images[collect(loader.epoch(0))[1].argsort()], next_images[next_labels.argsort()]
    assert all(not torch.equal(a, b) for a, b in zip(by_sample, next_by_sample))


def test_dali_reads_the_image_files_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No image byte passes through Python on the DALI path: its file reader reads them.
    Every way Python opens or reads a file is watched; the torchvision path shows the watch sees.
    (Building the train loader reads the headers of a sample of files once, to say where
    they decode: image_formats.decode_notice; that happens before the watch.)"""
    split = make_split(tmp_path, 6, "jpg")
    images = {str(tmp_path / path) for path in split.paths}
    opened = []
    spec = train_spec(split, 16, NATURAL, 2, batch_size=2)
    dali_train = DaliTrainLoader(spec)

    def watched(read):
        def call(file, *args, **kwargs):
            if str(file) in images:
                opened.append(str(file))
            return read(file, *args, **kwargs)
        return call

    for owner, name in ((builtins, "open"), (io, "open"), (os, "open"), (np, "fromfile"), (Path, "open"),
                        (Path, "read_bytes")):
        monkeypatch.setattr(owner, name, watched(getattr(owner, name)))
    train_images, _ = collect(dali_train.epoch(0))
    eval_images, _ = collect(dali_eval_loader(LoaderSpec(split=split, image_size=16, augmentation=NATURAL,
                                                         batch_size=4)))
    assert train_images.shape == (6, 2, 3, 16, 16) and eval_images.shape == (6, 3, 16, 16)
    assert opened == []
    collect(TorchTrainLoader(spec).epoch(0))
    assert set(opened) == images


def test_a_pass_decodes_no_batch_it_throws_away(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The feed ends each pass exactly: a file reader fed the epoch's list would run on
    into prefetched batches that a per-epoch pipeline throws away."""
    split = make_split(tmp_path, 12)
    decoded = []
    plain = dali_loader.decode

    def counted(encoded, aug, gpu, settings=dali_loader.EMPTY):
        return fn.python_function(plain(encoded, aug, gpu, settings), function=lambda x: decoded.append(1) or x)

    monkeypatch.setattr(dali_loader, "decode", counted)
    _, labels = collect(DaliTrainLoader(train_spec(split, 16, NATURAL, 1, batch_size=2)).epoch(0))
    assert len(decoded) == len(labels) == 12


def bad_image_message(split: Split, entry: int, problem: str) -> str:
    """The one message both loaders give for a bad image, written out independently."""
    fix = "fix the path or data.root" if problem == "missing" else "replace the file or remove its entry"
    return (f"{split.source}: entry {entry} ({split.root / split.paths[entry - 1]}) is {problem}; {fix}, and run "
            "'jrcl-fast check-data' to list every missing or corrupt image")


def loaders_of(split: Split) -> dict[str, object]:
    eval_spec, spec = LoaderSpec(split=split, image_size=16, augmentation=NATURAL, batch_size=2), \
        train_spec(split, 16, NATURAL, 2, batch_size=2)
    return {"dali eval": dali_eval_loader(eval_spec), "dali train": DaliTrainLoader(spec).epoch(0),
            "torch eval": torch_eval_loader(eval_spec), "torch train": TorchTrainLoader(spec).epoch(0)}


@pytest.mark.parametrize("bad_entry", [1, 4])  # in the batch DALI runs while starting, and in a later one
def test_a_corrupt_image_gives_one_message_the_same_on_both_loaders(tmp_path: Path, bad_entry: int,
                                                                    capfd: pytest.CaptureFixture) -> None:
    split = make_split(tmp_path, 6, "jpg")
    (tmp_path / split.paths[bad_entry - 1]).write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    messages = {}
    for name, batches in loaders_of(split).items():
        with pytest.raises(UserError) as caught:
            collect(batches)
        messages[name] = str(caught.value)
    reason = messages["torch eval"].split(" is corrupt (", 1)[1].split(")", 1)[0]
    assert set(messages.values()) == {bad_image_message(split, bad_entry, f"corrupt ({reason})")}, messages
    # nvImageCodec's own coloured "[ERROR] [jpeg_parser] ..." line is not printed besides it.
    assert capfd.readouterr().err == ""


def test_a_missing_image_gives_one_message_the_same_on_both_loaders(tmp_path: Path) -> None:
    split = make_split(tmp_path, 4, "jpg")
    (tmp_path / split.paths[2]).unlink()
    for name, batches in loaders_of(split).items():
        with pytest.raises(UserError) as caught:
            collect(batches)
        assert str(caught.value) == bad_image_message(split, 3, "missing"), name


def test_only_the_codec_log_is_dropped_from_stderr(capfd: pytest.CaptureFixture) -> None:
    codec_line = b"\x1b[0;31m[ERROR] \x1b[0m[jpeg_parser] Invalid marker\n"
    with codec_log_dropped():
        os.write(2, b"before\n" + codec_line + b"[ERROR] [nvjpeg-ext] plain\n")
        os.write(2, b"unterminated")
    os.write(2, b"\nafter\n")
    assert capfd.readouterr().err == "before\nunterminated\nafter\n"


@pipeline_def(enable_conditionals=False)
def crop_too_large(feed: PathFeed) -> tuple[DataNode, DataNode]:
    encoded, labels = read_files(feed, gpu=False)
    return fn.crop(fn.decoders.image(encoded, device="cpu"), crop=[10_000, 10_000]), labels


def test_a_failure_outside_decoding_is_not_blamed_on_the_data(tmp_path: Path) -> None:
    split = make_split(tmp_path, 2, "jpg")
    build = partial(crop_too_large, batch_size=2, num_threads=1, device_id=None)
    with pytest.raises(RuntimeError, match="fn.crop") as caught:
        collect(DaliBatches(split, np.arange(2), 2, build))
    assert not isinstance(caught.value, UserError)


def test_a_corrupt_image_in_a_torch_worker_keeps_its_one_line_message(tmp_path: Path) -> None:
    split = make_split(tmp_path, 4, "jpg")
    (tmp_path / split.paths[1]).write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    batches = torch_eval_loader(LoaderSpec(split=split, image_size=16, augmentation=NATURAL, batch_size=2, workers=1))
    batches.loader.multiprocessing_context = "spawn"  # no fork of a process that has run DALI's threads
    with pytest.raises(UserError) as caught:
        collect(batches)
    reason = str(caught.value).split(" is corrupt (", 1)[1].split(")", 1)[0]
    assert str(caught.value) == bad_image_message(split, 2, f"corrupt ({reason})")


def test_factories_pick_the_loader_of_the_config(tmp_path: Path) -> None:
    split = make_split(tmp_path, 12, labels=np.arange(12) % 3)
    dataset = LongTailedDataset("places_lt", ["a", "b", "c"], split, split)
    for loader in ("torch", "dali"):
        # No loader workers: forking this process after DALI's threads ran in it can deadlock a worker.
        cfg = DataConfig(name="places_lt", root=str(tmp_path), image_size=16, num_views=2, loader=loader, num_workers=0)
        train = build_train_loader(dataset, cfg, batch_size=4, seed=0)
        assert isinstance(train, DaliTrainLoader if loader == "dali" else TorchTrainLoader)
        images, labels = next(iter(train.epoch(0)))
        assert images.shape == (4, 2, 3, 16, 16) and labels.dtype == torch.int64
        images, labels = collect(build_eval_loader(dataset.test, dataset.name, cfg, batch_size=5))
        assert images.shape == (12, 3, 16, 16) and labels.dtype == torch.int64
