"""Decode throughput of chest-X-ray-like images: PNG (NIH as published) against the
copies `jrcl-fast prepare-images` writes (JPEG at --quality, lossless JPEG 2000), at
1024 px and after --max-side 512 and 256, with the disk size of each.

CPU (default): images/s on one core and on all cores, for the torchvision loader's
decode (PIL, jrcl_fast.data.images.load_rgb; all cores: one thread per core, PIL
releases the GIL) and for DALI's CPU pipeline (fn.decoders.image, device="cpu",
num_threads 1 and all cores).

    nice -n 5 python benchmarks/bench_decode.py --json docs/results/decode_cpu.json

GPU (benchmarks/gpu_session.sh): --gpu torchvision times torchvision.io.decode_jpeg
(device="cuda") on the JPEG copies (it needs no DALI); --gpu dali, where DALI imports,
the "mixed" decoder per format, JPEG with the hardware decoder's load at 0 and at
DALI's default.

The images are synthetic X-ray-like pictures (smooth anatomy-like gradients, film grain
noise): flat test images compress unrealistically well.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from machine import cpu_model
from PIL import Image
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jrcl_fast.data.image_formats import hardware_decodable, read_format  # noqa: E402
from jrcl_fast.data.images import load_rgb  # noqa: E402
from jrcl_fast.data.prepare_images import PrepareOptions, encode, source_pixels  # noqa: E402

SUFFIX = {"png": ".png", "jpeg": ".jpg", "jpeg2000": ".jp2"}


def synthetic_xray(size: int, seed: int) -> np.ndarray:
    """An 8-bit grayscale size x size picture with an X-ray's statistics: a bright
    body with two darker lung fields, a spine, rib-like bands and Gaussian grain."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    cx = 0.5 + rng.uniform(-0.03, 0.03)
    body = np.exp(-(((x - cx) / 0.42) ** 2) - ((y - 0.55) / 0.6) ** 2)
    lungs = sum(np.exp(-(((x - cx - dx) / 0.13) ** 2) - ((y - 0.45) / 0.22) ** 2) for dx in (-0.18, 0.18))
    spine = np.exp(-(((x - cx) / 0.035) ** 2))
    ribs = 0.06 * np.sin(2 * np.pi * (y * rng.uniform(9, 12) + 0.3 * np.abs(x - cx))) * lungs
    image = 40 + 170 * body - 90 * lungs + 50 * spine + 255 * ribs + rng.normal(0, 6, (size, size))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def write_pngs(folder: Path, count: int, size: int = 1024) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.png" for i in range(count)]
    for i, path in enumerate(paths):
        if not path.is_file():
            Image.fromarray(synthetic_xray(size, i), mode="L").save(path)
    return paths


def write_variant(sources: list[Path], folder: Path, fmt: str, max_side: int | None, quality: int) -> list[Path]:
    """The prepare-images copy of each source (PNG: re-saved as PNG after resizing)."""
    folder.mkdir(parents=True, exist_ok=True)
    options = PrepareOptions(folder, "jpeg" if fmt == "png" else fmt, quality, max_side, gray=True)
    out = []
    for src in sources:
        path = folder / (src.stem + SUFFIX[fmt])
        if not path.is_file():
            img = source_pixels(src, options)
            if fmt == "png":
                img.save(path)
            else:
                path.write_bytes(encode(img, options))
        out.append(path)
    return out


def pil_rate(paths: list[Path], threads: int, repeats: int) -> float:
    """The torchvision loader's decode: images/s over `repeats` passes."""
    began = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            list(pool.map(lambda p: load_rgb(p, grayscale=True), paths))
    return repeats * len(paths) / (time.perf_counter() - began)


def dali_rate(paths: list[Path], threads: int, repeats: int, device: str = "cpu",
              hw_decoder_load: float | None = None) -> float:
    """fn.decoders.image over the files as one batch, after a warm-up run: images/s."""
    from nvidia.dali import fn, pipeline_def, types

    extra = {} if hw_decoder_load is None else {"hw_decoder_load": hw_decoder_load}

    @pipeline_def(batch_size=len(paths), num_threads=threads, device_id=0 if device == "mixed" else None,
                  prefetch_queue_depth=1)
    def decode_all():
        encoded, _ = fn.readers.file(files=[str(p) for p in paths], labels=list(range(len(paths))))
        return fn.decoders.image(encoded, device=device, output_type=types.GRAY, **extra)

    pipe = decode_all()
    pipe.build()
    pipe.run()
    began = time.perf_counter()
    for _ in range(repeats):
        pipe.run()
    return repeats * len(paths) / (time.perf_counter() - began)


def cpu_rows(sources: list[Path], work: Path, args: argparse.Namespace, console: Console) -> list[dict]:
    cores = os.cpu_count() or 1
    rows = []
    for side in args.sizes:
        for fmt in args.formats:
            max_side = None if side >= 1024 else side
            paths = write_variant(sources, work / f"{fmt}_{side}", fmt, max_side, args.quality)
            repeats = max(1, args.repeats * 1024 // side // (4 if fmt == "jpeg2000" else 1))
            row = {"side": side, "format": fmt, "images": len(paths),
                   "kib_per_image": sum(p.stat().st_size for p in paths) / len(paths) / 1024,
                   "torch_1core": pil_rate(paths, 1, repeats), f"torch_{cores}cores": pil_rate(paths, cores, repeats)}
            if args.dali:
                row["dali_1thread"] = dali_rate(paths, 1, repeats)
                row[f"dali_{cores}threads"] = dali_rate(paths, cores, repeats)
            rows.append(row)
            console.print(row, highlight=False)
    return rows


def torchvision_gpu_rows(sources: list[Path], work: Path, args: argparse.Namespace, console: Console) -> list[dict]:
    """torchvision.io.decode_jpeg(device="cuda") on the JPEG copies, a batch at a time:
    the GPU decode a node without DALI has."""
    import torch
    import torchvision.io as tio

    rows = []
    for side in args.sizes:
        max_side = None if side >= 1024 else side
        jpegs = write_variant(sources, work / f"jpeg_{side}", "jpeg", max_side, args.quality)
        data = [tio.read_file(str(p)) for p in jpegs]
        tio.decode_jpeg(data, device="cuda")
        torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(args.repeats):
            tio.decode_jpeg(data, device="cuda")
        torch.cuda.synchronize()
        rows.append({"side": side, "format": "jpeg", "decoder": "torchvision decode_jpeg cuda",
                     "images_per_s": args.repeats * len(data) / (time.perf_counter() - began)})
        console.print(rows[-1], highlight=False)
    return rows


def dali_gpu_rows(sources: list[Path], work: Path, args: argparse.Namespace, console: Console) -> list[dict]:
    """DALI's mixed decoder per format and size; JPEG with the hardware decoder off
    (hw_decoder_load 0) and at DALI's default, with the share of files it can take."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        console.print("DALI is not installed here: no mixed-decoder rows")
        return []
    rows = []
    for side in args.sizes:
        for fmt in args.formats:
            max_side = None if side >= 1024 else side
            paths = write_variant(sources, work / f"{fmt}_{side}", fmt, max_side, args.quality)
            hw_share = sum(hardware_decodable(read_format(p)) for p in paths) / len(paths)
            for load in ((0.0, None) if fmt == "jpeg" else (None,)):
                rows.append({"side": side, "format": fmt, "decoder": "DALI mixed", "hw_decoder_load": load,
                             "hardware_decodable_share": hw_share,
                             "images_per_s": dali_rate(paths, os.cpu_count() or 1, args.repeats, "mixed", load)})
                console.print(rows[-1], highlight=False)
    return rows


def table(rows: list[dict], title: str) -> Table:
    out = Table(title=title)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    for key in keys:
        out.add_column(key, justify="right")
    for row in rows:
        out.add_row(*[f"{row[k]:,.1f}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32, help="synthetic 1024 x 1024 X-rays")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 512, 256])
    parser.add_argument("--formats", nargs="+", default=["png", "jpeg", "jpeg2000"], choices=list(SUFFIX))
    parser.add_argument("--quality", type=int, default=95)
    parser.add_argument("--repeats", type=int, default=2, help="passes at 1024 px (more at smaller sizes)")
    parser.add_argument("--folder", type=Path, help="where the images go (default: a temporary folder)")
    parser.add_argument("--no-dali", dest="dali", action="store_false", help="CPU: skip DALI's CPU pipeline")
    parser.add_argument("--gpu", choices=("torchvision", "dali"),
                        help="time a GPU decoder instead (gpu_session.sh): torchvision's decode_jpeg or DALI mixed")
    parser.add_argument("--json", type=Path, help="write the rows and the machine here")
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.folder or Path(tmp)
        sources = write_pngs(work / "source", args.images)
        measure = {None: cpu_rows, "torchvision": torchvision_gpu_rows, "dali": dali_gpu_rows}[args.gpu]
        rows = measure(sources, work, args, console)
    machine = f"{cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end"
    console.print(table(rows, f"decode images/s, {args.images} synthetic X-rays ({machine})"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "command": " ".join(sys.argv), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
