"""Training-input throughput: DALI vs the torchvision DataLoader, side by side.

Both loaders read the same generated files, apply the same augmentation (augment.py:
natural for the JPEG profiles, xray for the PNG one), make the same number of views
and use the same worker count (DataLoader worker processes = DALI threads). A row
times full training epochs, start-up included, on a warm page cache; the loaders
alternate for --repeats rounds and the best round of each counts, so load from other
processes on a shared machine biases neither side (the JSON records the load average).

    python benchmarks/bench_data.py --quick          # a minute or two on 2 cores
    python benchmarks/bench_data.py --json out.json  # a few thousand images

With --steps it also breaks one image's work into the steps each path runs (decode,
then each transform of one view), timed on one thread, to show where the time goes.

Not a test: the figures depend on the machine; docs/BENCHMARKS.md records them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from machine import cpu_model
from nvidia.dali import fn, pipeline_def
from nvidia.dali.pipeline import DataNode
from PIL import Image
from rich.console import Console
from rich.table import Table

from jrcl_fast.data.augment import AUGMENTATIONS, Augmentation
from jrcl_fast.data.dali_loader import DaliTrainLoader, dali_on_gpu, decode, view_steps
from jrcl_fast.data.images import load_rgb
from jrcl_fast.data.loader_contract import TrainLoader, TrainSpec
from jrcl_fast.data.long_tailed_dataset import Split
from jrcl_fast.data.torch_loader import TorchTrainLoader, train_transform


@dataclass(frozen=True)
class Profile:
    name: str
    size: tuple[int, int]  # height, width
    grayscale: bool
    ext: str
    count: int
    quick_count: int

    @property
    def augmentation(self) -> str:
        return "xray" if self.grayscale else "natural"


PROFILES = (
    Profile("places-like 256 px JPEG", (256, 256), False, "jpg", 2000, 256),
    Profile("inat-like 800x600 JPEG", (600, 800), False, "jpg", 1000, 128),
    Profile("cxr-like 1024 px gray PNG", (1024, 1024), True, "png", 400, 64),
)


def synthetic_photo(rng: np.random.Generator, size: tuple[int, int], grayscale: bool) -> Image.Image:
    """Smooth structure plus grain, so encoded sizes resemble photos (noise alone
    would not compress, flat colour would compress to nothing)."""
    channels = 1 if grayscale else 3
    coarse = rng.integers(0, 256, (size[0] // 32 + 1, size[1] // 32 + 1, channels), dtype=np.uint8)
    base = Image.fromarray(coarse.squeeze(), "L" if grayscale else "RGB").resize(size[::-1], Image.BICUBIC)
    grain = rng.normal(0, 6, (*size, channels)).squeeze()
    return Image.fromarray(np.clip(np.asarray(base, np.float32) + grain, 0, 255).astype(np.uint8))


def generate(folder: Path, profile: Profile, count: int) -> Split:
    """`count` images of the profile under folder, written once and reused."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        rel = f"{profile.ext}_{profile.size[0]}x{profile.size[1]}/{i:05d}.{profile.ext}"
        if not (folder / rel).is_file():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            synthetic_photo(rng, profile.size, profile.grayscale).save(folder / rel, quality=90)
        paths.append(rel)
    return Split(folder, paths, np.arange(count) % 100, f"generated {profile.name}")


def images_per_second(loader: TrainLoader) -> float:
    start, seen = time.perf_counter(), 0
    for images, _ in loader.epoch(0):
        seen += images.shape[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def torch_step_ms(split: Split, image_size: int, aug: Augmentation) -> list[tuple[str, float]]:
    """ms per image of PIL decode, then of each train_transform step of one view, on one
    thread (a DataLoader worker runs one thread)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds = _torch_step_seconds(split, train_transform(image_size, aug).transforms, aug.grayscale)
    finally:
        torch.set_num_threads(threads)
    return [(name, 1e3 * t / len(split)) for name, t in seconds.items()]


def _torch_step_seconds(split: Split, steps: list[Callable], grayscale: bool) -> dict[str, float]:
    seconds = {"PIL decode (load_rgb)": 0.0} | {type(step).__name__: 0.0 for step in steps}
    for path in split.paths:
        start = time.perf_counter()
        x = load_rgb(split.root / path, grayscale)
        seconds["PIL decode (load_rgb)"] += time.perf_counter() - start
        for step in steps:
            start = time.perf_counter()
            x = step(x)
            seconds[type(step).__name__] += time.perf_counter() - start
    return seconds


def dali_step_ms(split: Split, image_size: int, aug: Augmentation, repeats: int = 10) -> list[tuple[str, float]]:
    """ms per image of DALI CPU decode, then of each view_steps step of one view, on one
    thread: pipeline k runs the first k steps, a step costs the difference of two
    consecutive pipelines (best of `repeats` runs each, the feed's cost cancels)."""
    encoded = [np.fromfile(split.root / path, dtype=np.uint8) for path in split.paths]
    stages = [("decoders.image (cpu)", lambda x: decode(x, aug, gpu=False)), *view_steps(image_size, aug)]

    @pipeline_def(batch_size=len(encoded), num_threads=1, device_id=None, seed=0, prefetch_queue_depth=1)
    def first(k: int) -> DataNode:
        x = fn.external_source(source=lambda: encoded, batch=True)
        for _, stage in stages[:k]:
            x = stage(x)
        return x

    seconds = []
    for k in range(len(stages) + 1):
        pipe = first(k)
        pipe.build()
        pipe.run()  # warm-up: allocations
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            pipe.run()
            runs.append(time.perf_counter() - start)
        seconds.append(min(runs))
    return [(name, 1e3 * (seconds[k + 1] - seconds[k]) / len(encoded)) for k, (name, _) in enumerate(stages)]


def steps_table(profile: Profile, path_steps: dict[str, list[tuple[str, float]]], views: int) -> Table:
    table = Table(title=f"{profile.name}: where one image's time goes (1 thread, ms per image)")
    for column in ("path", "step", "ms"):
        table.add_column(column, justify="right" if column == "ms" else "left")
    for path, steps in path_steps.items():
        for i, (step, ms) in enumerate(steps):
            table.add_row(path if i == 0 else "", step if i == 0 else f"view: {step}", f"{ms:.2f}")
        table.add_row("", f"decode + {views} x view", f"{image_ms(steps, views):.2f}", end_section=True)
    return table


def image_ms(steps: list[tuple[str, float]], views: int) -> float:
    """The first step is the decode, done once; the others run once per view."""
    return steps[0][1] + views * sum(ms for _, ms in steps[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/jrcl_bench_data"), help="where images are generated")
    parser.add_argument("--quick", action="store_true", help="a few hundred images instead of a few thousand")
    parser.add_argument("--images", type=int, help="images per profile (overrides the profile's count)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers = DALI threads")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds per loader; the best counts")
    parser.add_argument("--steps", action="store_true", help="also time each path's steps on one thread")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.images is not None and args.images < args.batch_size:
        parser.error(f"--images {args.images} is smaller than --batch-size {args.batch_size}: no full batch to time")

    console, rows = Console(), []
    for profile in PROFILES:
        count = args.images or (profile.quick_count if args.quick else profile.count)
        split = generate(args.folder, profile, count)
        for path in split.paths:  # warm the page cache for both loaders alike
            (split.root / path).read_bytes()
        aug = AUGMENTATIONS[profile.augmentation]
        spec = TrainSpec(split=split, image_size=args.image_size, augmentation=aug, num_views=args.views,
                         batch_size=args.batch_size, sampler="instance", seed=0, workers=args.workers)
        loaders = (TorchTrainLoader(spec), DaliTrainLoader(spec))
        rounds = [[images_per_second(loader) for loader in loaders] for _ in range(args.repeats)]
        torch_rate, dali_rate = np.max(rounds, axis=0).tolist()
        rows.append({"profile": profile.name, "augmentation": profile.augmentation, "images": len(split),
                     "torch_images_per_s": round(torch_rate, 1),
                     "dali_images_per_s": round(dali_rate, 1), "dali_over_torch": round(dali_rate / torch_rate, 2)})
        if args.steps:
            sample = Split(split.root, split.paths[:64], split.labels[:64], split.source)
            path_steps = {"torchvision": torch_step_ms(sample, args.image_size, aug),
                          "DALI CPU": dali_step_ms(sample, args.image_size, aug)}
            console.print(steps_table(profile, path_steps, args.views))
            rows[-1]["steps_ms_per_image"] = {path: [{"step": name, "ms": round(ms, 3)} for name, ms in steps]
                                              for path, steps in path_steps.items()}
            rows[-1]["steps_image_ms"] = {path: round(image_ms(steps, args.views), 3)
                                          for path, steps in path_steps.items()}

    device = torch.cuda.get_device_name() if dali_on_gpu() else f"CPU only: {cpu_model()}"
    table = Table(title=f"Train input, {args.views} views of {args.image_size} px, batch {args.batch_size}, "
                        f"{args.workers} workers ({device})")
    for column in ("profile", "images", "torchvision img/s", "DALI img/s", "DALI / torchvision"):
        table.add_column(column, justify="left" if column == "profile" else "right")
    for row in rows:
        table.add_row(row["profile"], str(row["images"]), f"{row['torch_images_per_s']:.1f}",
                      f"{row['dali_images_per_s']:.1f}", f"{row['dali_over_torch']:.2f}x")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"device": device, "cpu": cpu_model(), "cores": os.cpu_count(),
                                         "load_average_1_5_15_min": os.getloadavg(),
                                         "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
