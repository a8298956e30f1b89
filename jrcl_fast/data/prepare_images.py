"""prepare-images: a GPU-decodable copy of a data set's images, and its split files.

DALI's mixed decoder decodes PNG on the host's CPU (image_formats.py); NIH-CXR-LT is
112,120 PNGs. This writes every image of every split the config reads to DIR under the
same relative path with a new extension, as JPEG at a chosen quality or as reversible
(lossless) JPEG 2000, optionally shrunk first so its longer side is at most --max-side,
and writes the split files (CSV, COCO JSON or list file) with their paths rewritten,
so `--set data.root=DIR` trains on the copy. A source that a GPU run already decodes on
the GPU, with no resizing asked for, is copied byte for byte under its own name: a
second lossy encode would only cost quality.

Lossless JPEG (SOF3), which DALI decodes on the GPU for grayscale output, is not
offered: Pillow cannot write it. A GPU run may evaluate it (docs/BENCHMARKS.md).

Each file is written atomically (jrcl_fast/atomic.py) only after it is checked, so a
file that exists under DIR is finished and a rerun skips it. A lossless copy is decoded
again, by Pillow and, where installed, by OpenCV (`pip install jrcl-fast[prepare]`),
and must equal the pixels it was made from (the source as the loaders decode it,
resized when --max-side is given). Pillow and OpenCV both decode JPEG 2000 with
OpenJPEG, so for JPEG 2000 the second decode checks the file and its reading, not an
independent codec.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from jrcl_fast.atomic import atomic_write_bytes
from jrcl_fast.cores import available_cores
from jrcl_fast.data.image_formats import GPU, decode_placement, read_format
from jrcl_fast.data.images import ImageError, load_rgb
from jrcl_fast.data.long_tailed_dataset import LongTailedDataset, Split
from jrcl_fast.errors import UserError

FORMATS = {"jpeg": ".jpg", "jpeg2000": ".jp2"}
LOSSLESS = ("jpeg2000",)
SPEED_SAMPLE = 32  # files decoded (one core) to report CPU decode speed before and after


@dataclass(frozen=True)
class PrepareOptions:
    out: Path
    format: str = "jpeg2000"  # a key of FORMATS
    quality: int = 95  # JPEG only
    max_side: int | None = None
    gray: bool = False  # X-rays: one channel, as the loaders decode them


@dataclass(frozen=True)
class FileResult:
    rel: str  # the source's path relative to data.root
    new_rel: str  # the copy's
    bytes_before: int
    bytes_after: int
    action: str  # converted | copied | skipped (finished by an earlier run)
    psnr_db: float | None = None  # lossy copies: against the (resized) source; inf when equal


def target_rel(rel: str, source_on_gpu: bool, options: PrepareOptions) -> str:
    """The copy's relative path: the source's own when it is copied as it is."""
    if source_on_gpu and options.max_side is None:
        return rel
    return str(PurePosixPath(rel).with_suffix(FORMATS[options.format]))


def source_pixels(path: Path, options: PrepareOptions) -> Image.Image:
    """The source as the loaders decode it (8-bit L for X-rays, else RGB), shrunk with
    Lanczos so its longer side is at most max_side (never enlarged)."""
    img = load_rgb(path, grayscale=options.gray)
    if options.gray:
        img = img.convert("L")  # exact: the RGB planes are equal
    side = max(img.size)
    if options.max_side is not None and side > options.max_side:
        scale = options.max_side / side
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return img


def encode(img: Image.Image, options: PrepareOptions) -> bytes:
    buffer = io.BytesIO()
    if options.format == "jpeg":
        img.save(buffer, "JPEG", quality=options.quality)  # baseline, Huffman: hardware decodable
    else:
        img.save(buffer, "JPEG2000", irreversible=False, no_jp2=False)  # reversible 5/3 wavelet: lossless
    return buffer.getvalue()


def second_decoder() -> Callable[[bytes], np.ndarray] | None:
    """OpenCV's decoder where it is installed (the prepare extra), else None."""
    try:
        import cv2
    except ImportError:
        return None

    def decode(data: bytes) -> np.ndarray:
        out = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        return out[..., ::-1] if out is not None and out.ndim == 3 else out  # BGR -> RGB

    return decode


def verify(data: bytes, img: Image.Image, rel: str, lossless: bool) -> float:
    """PSNR (dB) of the encoded copy against `img`; a lossless copy must match exactly,
    decoded by Pillow and by the second decoder where there is one."""
    expected = np.asarray(img)
    with Image.open(io.BytesIO(data)) as copy:
        decoded = np.asarray(copy.convert(img.mode))
    decoders = [("Pillow", decoded)]
    if lossless and (other := second_decoder()) is not None:
        decoders.append(("OpenCV", other(data)))
    if lossless:
        for name, pixels in decoders:
            if pixels is None or pixels.shape != expected.shape or not np.array_equal(pixels, expected):
                raise UserError(f"{rel}: the lossless copy does not decode ({name}) to the source's pixels; "
                                "report it with the file, and keep the original")
    mse = float(np.mean((decoded.astype(np.float64) - expected) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def prepare_file(task: tuple[Path, str, PrepareOptions]) -> FileResult:
    """Convert (or copy) one file; runs in a worker process."""
    root, rel, options = task
    src = root / rel
    try:
        source_on_gpu = decode_placement(read_format(src), options.gray) == GPU
    except FileNotFoundError:
        raise UserError(f"{src} does not exist; run 'jrcl-fast check-data' on the config to list "
                        "every missing or corrupt image") from None
    new_rel = target_rel(rel, source_on_gpu, options)
    dst = options.out / new_rel
    if dst.is_file():
        return FileResult(rel, new_rel, src.stat().st_size, dst.stat().st_size, "skipped")
    if new_rel == rel:
        data, action, psnr = src.read_bytes(), "copied", math.inf
    else:
        try:
            img = source_pixels(src, options)
        except ImageError as err:
            raise UserError(f"{src} is {err.problem}; replace it or remove its entry, then rerun") from None
        data, action = encode(img, options), "converted"
        psnr = verify(data, img, rel, options.format in LOSSLESS)
    atomic_write_bytes(dst, lambda f: f.write(data))
    return FileResult(rel, new_rel, src.stat().st_size, len(data), action, psnr)


def rewrite_path(cell: str, new_rel: str) -> str:
    """The split file's path text with the copy's extension."""
    return str(PurePosixPath(cell).with_suffix(PurePosixPath(new_rel).suffix))


def _csv_rows(source: Path, new_paths: list[str], old_paths: list[str]) -> str:
    with source.open(newline="") as handle:
        rows = list(csv.reader(handle))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(rows[0])
    for row, old, new in zip(rows[1:], old_paths, new_paths, strict=True):
        # The path column is the cell the split's path ends with (NIH: the bare file name).
        writer.writerow([rewrite_path(c, new) if "." in c and old.endswith(c) else c for c in row])
    return out.getvalue()


def _json_images(source: Path, new_paths: list[str]) -> str:
    data = json.loads(source.read_text())
    for image, new in zip(data["images"], new_paths, strict=True):
        image["file_name"] = rewrite_path(image["file_name"], new)
    return json.dumps(data)


def _list_lines(source: Path, new_paths: list[str]) -> str:
    lines = [line for line in source.read_text().splitlines() if line.strip()]
    out = []
    for line, new in zip(lines, new_paths, strict=True):
        path, label = line.rsplit(maxsplit=1)
        out.append(f"{rewrite_path(path, new)} {label}\n")
    return "".join(out)


def rewrite_split_file(split: Split, new_paths: list[str], root: Path, out: Path) -> Path:
    """Write split.source under `out` (same path relative to `root`) with entry i's image
    path given the extension of new_paths[i]; the entries are the file's rows in order."""
    source = Path(split.source)
    try:
        target = out / source.relative_to(root)
    except ValueError:
        raise UserError(f"split file {source} is not under data.root {root}; prepare-images copies "
                        "only data sets whose split files live in data.root") from None
    if source.suffix == ".csv":
        text = _csv_rows(source, new_paths, split.paths)
    elif source.suffix == ".json":
        text = _json_images(source, new_paths)
    elif source.suffix == ".txt":
        text = _list_lines(source, new_paths)
    else:
        raise UserError(f"split file {source}: prepare-images reads CSV, COCO JSON and list (.txt) split "
                        "files; this data set has none of them")
    atomic_write_bytes(target, lambda f: f.write(text.encode()))
    return target


def cpu_decode_speed(paths: Iterable[Path], gray: bool) -> float:
    """Images per second that Pillow decodes (as the torchvision loader does), one core."""
    paths = list(paths)
    began = time.perf_counter()
    for path in paths:
        load_rgb(path, grayscale=gray)
    return len(paths) / max(time.perf_counter() - began, 1e-9)


@dataclass(frozen=True)
class PrepareSummary:
    files: int
    converted: int
    copied: int
    skipped: int
    bytes_before: int
    bytes_after: int
    decode_per_s_before: float
    decode_per_s_after: float
    min_psnr_db: float | None  # lossy JPEG: the worst file written by this run
    verified_lossless: int  # files checked pixel-exact by this run
    verified_by: list[str]
    split_files: list[str]
    format: str
    max_side: int | None
    quality: int


def check_same_options(options: PrepareOptions) -> None:
    """A rerun skips the files an earlier run finished, so it must ask for the same copy."""
    record = options.out / "prepare-images.json"
    if not record.is_file():
        return
    earlier = json.loads(record.read_text())
    asked = {"format": options.format, "max_side": options.max_side, "quality": options.quality}
    differ = [k for k, v in asked.items() if earlier.get(k) != v and not (k == "quality" and options.format != "jpeg")]
    if differ:
        was = ", ".join(f"{k} {earlier.get(k)}" for k in differ)
        raise UserError(f"--out {options.out} holds a copy made with {was}; a rerun there skips finished files, "
                        "so give the same options or a new --out folder")


def _run_parallel(tasks: list[tuple[Path, str, PrepareOptions]], workers: int, console: Console) -> list[FileResult]:
    columns = (TextColumn("prepare-images"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    results = []
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("files", total=len(tasks))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for result in pool.map(prepare_file, tasks, chunksize=max(1, min(64, len(tasks) // (8 * workers)))):
                results.append(result)
                progress.advance(bar)
    return results


def prepare_images(dataset: LongTailedDataset, root: Path, options: PrepareOptions, workers: int,
                   console: Console) -> PrepareSummary:
    """Copy every image of every split (once, however many splits name it), then the split files."""
    splits = dataset.splits()
    unique = sorted({(split.root, rel) for split in splits.values() for rel in split.paths})
    results = _run_parallel([(image_root, rel, options) for image_root, rel in unique], workers, console)
    new_rel = {(image_root, r.rel): r.new_rel for (image_root, _), r in zip(unique, results)}
    written = []
    for split in {s.source: s for s in splits.values()}.values():
        paths = [new_rel[(split.root, rel)] for rel in split.paths]
        written.append(str(rewrite_split_file(split, paths, root, options.out)))
    sample = random.Random(0).sample(list(zip(unique, results)), min(SPEED_SAMPLE, len(unique)))
    fresh = [r for r in results if r.action == "converted"]
    lossy = [r.psnr_db for r in fresh if r.psnr_db is not None] if options.format not in LOSSLESS else []
    verifiers = ["Pillow"] + (["OpenCV"] if second_decoder() is not None else [])
    return PrepareSummary(
        files=len(results), converted=len(fresh), copied=sum(r.action == "copied" for r in results),
        skipped=sum(r.action == "skipped" for r in results),
        bytes_before=sum(r.bytes_before for r in results), bytes_after=sum(r.bytes_after for r in results),
        decode_per_s_before=cpu_decode_speed((image_root / r.rel for (image_root, _), r in sample), options.gray),
        decode_per_s_after=cpu_decode_speed((options.out / r.new_rel for _, r in sample), options.gray),
        min_psnr_db=min(lossy) if lossy else None,
        verified_lossless=len(fresh) if options.format in LOSSLESS else 0,
        verified_by=verifiers if options.format in LOSSLESS else [], split_files=written,
        format=options.format, max_side=options.max_side, quality=options.quality,
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def summary_table(s: PrepareSummary) -> Table:
    table = Table(title=f"prepare-images: {s.format}" + (f", max side {s.max_side}" if s.max_side else ""))
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("files", f"{s.files:,}", f"{s.converted:,} written, {s.copied:,} copied, {s.skipped:,} done before")
    share = s.bytes_after / max(s.bytes_before, 1)
    table.add_row("bytes", _mib(s.bytes_before), f"{_mib(s.bytes_after)} ({share:.0%})")
    table.add_row("CPU decode, Pillow, 1 core", f"{s.decode_per_s_before:,.1f} img/s",
                  f"{s.decode_per_s_after:,.1f} img/s")
    if s.verified_by:
        table.add_row("pixel-exact", "", f"{s.verified_lossless:,} files ({' and '.join(s.verified_by)})")
    if s.min_psnr_db is not None:
        table.add_row("worst PSNR", "", f"{s.min_psnr_db:.1f} dB")
    return table


def cpu_slowdown_note(s: PrepareSummary) -> str | None:
    """A copy that decodes slower than its source on the CPU is for GPU runs only."""
    if s.decode_per_s_after >= s.decode_per_s_before or s.files == 0:
        return None
    factor = s.decode_per_s_before / max(s.decode_per_s_after, 1e-9)
    return (f"on the CPU this copy decodes {factor:.1f}x slower than the original images (table above): it is for "
            "GPU runs, where DALI decodes it on the GPU; CPU runs should keep training on the originals")


def run_prepare(dataset: LongTailedDataset, root: Path, options: PrepareOptions, workers: int,
                console: Console) -> PrepareSummary:
    """The command: prepare, show the table (and the CPU note), write DIR/prepare-images.json."""
    if options.out.resolve() == root.resolve():
        raise UserError(f"--out {options.out} is data.root itself; give a new folder for the copy")
    check_same_options(options)
    summary = prepare_images(dataset, root, options, max(1, workers), console)
    console.print(summary_table(summary))
    if (note := cpu_slowdown_note(summary)) is not None:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    console.print(f"train on the copy with --set data.root={options.out}", highlight=False, soft_wrap=True)
    record = {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(summary).items()}
    atomic_write_bytes(options.out / "prepare-images.json", lambda f: f.write(json.dumps(record, indent=2).encode()))
    return summary


def prepare_command(config: str, overrides: list[str], out: Path, fmt: str, quality: int, max_side: int | None,
                    console: Console) -> None:
    """`jrcl-fast prepare-images`: the config's data set, copied to `out`."""
    from jrcl_fast.config import load_config
    from jrcl_fast.data.augment import augmentation_for
    from jrcl_fast.data.catalog import load_dataset

    if not 1 <= quality <= 100:
        raise UserError(f"--quality {quality}: give a JPEG quality from 1 to 100 (95 keeps X-ray detail)")
    if max_side is not None and max_side < 1:
        raise UserError(f"--max-side {max_side}: give a positive number of pixels, e.g. 256")
    cfg = load_config(config, overrides)
    dataset = load_dataset(cfg.data)
    options = PrepareOptions(out.expanduser(), fmt, quality, max_side, augmentation_for(dataset.name).grayscale)
    run_prepare(dataset, Path(cfg.data.root).expanduser(), options, available_cores(), console)
