"""Where DALI decodes an image file: its format, read from the file's own header bytes.

A DALI "mixed" decoder (fn.decoders.image, device="mixed") decodes on the GPU only the
formats nvImageCodec has GPU codecs for, and every other file on the host's CPU threads
inside the same operator, silently. The rule here, and its sources:

* DALI 2.4, fn.decoders.image: "GPU accelerated decoding is only available for a subset
  of the image formats (JPEG, and JPEG2000). For other formats, a CPU based decoder is
  used. For JPEG, a dedicated HW decoder will be used when available."
  (docs.nvidia.com/deeplearning/dali/user-guide/docs/operations/nvidia.dali.fn.decoders.image.html)
  PNG, TIFF, BMP, WebP, GIF and PNM are therefore CPU.
* nvJPEG (CUDA 13.0 documentation, 1. Introduction): baseline and progressive JPEG,
  8 bits per sample, Huffman coding; the hardware decoder (A100, H100) takes baseline
  only. So SOF0/SOF1/SOF2 at 8 bits go to the GPU (SOF0 to the hardware engine), while
  12-bit (SOF1/SOF2 at precision 12) and arithmetic-coded frames (SOF9-SOF11) go to
  the CPU (libjpeg-turbo). Colour: gray or YCbCr only; Adobe APP14 CMYK/YCCK and
  untransformed RGB frames go to the CPU (the conservative reading of the project's
  rule; the GPU session measures it).
* Lossless JPEG (SOF3, Huffman): DALI's nvjpeg_lossless decoder (since DALI 1.23,
  dali/imgcodec/decoders/nvjpeg_lossless/nvjpeg_lossless.cc: CanDecode takes SOF3 only,
  and only for GRAY or ANY_DATA output). The X-ray pipelines decode to GRAY, so a
  lossless X-ray goes to the GPU; an RGB-output pipeline decodes it on the CPU.
  Hierarchical/differential frames (SOF5-7, SOF13-15) are CPU.
* JPEG 2000 (raw J2K codestream or JP2 box file): nvJPEG2000, on the GPU.

Only headers are read (a few KiB per file), so a loader can sample a split at start-up
and check-data can classify every file.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from jrcl_fast.config import DecoderConfig
from jrcl_fast.errors import UserError

GPU, CPU = "gpu", "cpu"
FIRST_READ = 4096  # the signature, and the SOF of a JPEG without a large EXIF or ICC block
HEADER_BYTES = 1 << 16  # then a JPEG is read on in steps of at least this (an APPn segment is at most 64 KiB)

# SOFn marker -> JPEG coding process (ITU-T T.81, Table B.1).
SOF_PROCESS = {
    0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive", 0xC3: "lossless",
    0xC5: "differential sequential", 0xC6: "differential progressive", 0xC7: "differential lossless",
    0xC9: "arithmetic extended", 0xCA: "arithmetic progressive", 0xCB: "arithmetic lossless",
    0xCD: "arithmetic differential sequential", 0xCE: "arithmetic differential progressive",
    0xCF: "arithmetic differential lossless",
}
GPU_DCT_PROCESSES = ("baseline", "extended", "progressive")  # nvJPEG, 8-bit Huffman
STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: no length field


@dataclass(frozen=True)
class ImageFormat:
    """What a file's header says. `process`, `precision`, `components` and `color` are
    set for JPEG (color: gray, ycbcr, rgb, cmyk or ycck); `codestream` for JPEG 2000."""

    name: str  # png, jpeg, jpeg2000, tiff, bmp, webp, gif, pnm, unknown
    process: str = ""
    precision: int = 0
    components: int = 0
    color: str = ""

    @property
    def label(self) -> str:
        if self.name != "jpeg":
            return self.name
        if self.process == "unknown":
            return "jpeg without a frame header"  # truncated or corrupt: check-data lists it
        return f"jpeg {self.process} {self.precision}-bit {self.color}"


def _jpeg_color(components: int, adobe_transform: int | None) -> str:
    """Adobe APP14's transform flag: 0 unknown (RGB or CMYK), 1 YCbCr, 2 YCCK."""
    if components == 1:
        return "gray"
    if components == 3:
        return "rgb" if adobe_transform == 0 else "ycbcr"
    if components == 4:
        return "ycck" if adobe_transform == 2 else "cmyk"
    return f"{components}-component"


def parse_jpeg(data: bytes) -> ImageFormat:
    """Walk the marker segments after SOI to the first SOFn (and any Adobe APP14 before
    the scan data). A header cut off before its SOF is a JPEG of unknown process."""
    pos, adobe_transform, frame = 2, None, None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in STANDALONE_MARKERS:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        segment = data[pos + 4:pos + 2 + length]
        if marker == 0xEE and segment[:5] == b"Adobe" and len(segment) >= 12:
            adobe_transform = segment[11]
        elif marker in SOF_PROCESS and frame is None and len(segment) >= 6:
            frame = (SOF_PROCESS[marker], segment[0], segment[5])
        elif marker == 0xDA:  # start of scan: the header is over
            break
        pos += 2 + length
    if frame is None:
        return ImageFormat("jpeg", process="unknown")
    process, precision, components = frame
    return ImageFormat("jpeg", process, precision, components, _jpeg_color(components, adobe_transform))


MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jpeg2000"),  # JP2 signature box
    (b"\xff\x4f\xff\x51", "jpeg2000"),  # raw codestream: SOC then SIZ
    (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"),
    (b"BM", "bmp"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
)


def sniff(data: bytes) -> ImageFormat:
    """The format of a file from its first bytes (at least up to the JPEG SOF marker)."""
    if data[:3] == b"\xff\xd8\xff":
        return parse_jpeg(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ImageFormat("webp")
    if data[:1] == b"P" and data[1:2] in b"123456" and len(data) > 2 and data[2:3].isspace():
        return ImageFormat("pnm")
    return next((ImageFormat(name) for magic, name in MAGIC if data.startswith(magic)), ImageFormat("unknown"))


def read_format(path: Path) -> ImageFormat:
    """The format of the file at `path` from its header bytes, whatever its extension.
    Reads FIRST_READ bytes, and more only for a JPEG whose SOF lies further (past a
    large EXIF or ICC block): check-data reads the header of every file of a data set."""
    with open(path, "rb") as f:
        head = f.read(FIRST_READ)
        found = sniff(head)
        while found.name == "jpeg" and found.process == "unknown" and (more := f.read(max(len(head), HEADER_BYTES))):
            head += more
            found = sniff(head)
    return found


def decode_placement(fmt: ImageFormat, gray_output: bool = True) -> str:
    """GPU or CPU: where a DALI "mixed" fn.decoders.image decodes this file (module doc)."""
    if fmt.name == "jpeg2000":
        return GPU
    if fmt.name != "jpeg":
        return CPU
    if fmt.process == "lossless":
        return GPU if gray_output else CPU
    gpu_color = fmt.color in ("gray", "ycbcr")
    return GPU if fmt.process in GPU_DCT_PROCESSES and fmt.precision == 8 and gpu_color else CPU


def hardware_decodable(fmt: ImageFormat) -> bool:
    """Baseline JPEG: what the A100/H100 hardware JPEG engine takes (hw_decoder_load)."""
    return decode_placement(fmt) == GPU and fmt.process == "baseline"


@dataclass(frozen=True)
class FormatCensus:
    """Formats of the `checked` files that could be read."""

    counts: Counter  # ImageFormat.label -> files
    cpu_counts: Counter  # label -> files a GPU run decodes on the CPU
    checked: int

    @property
    def cpu_share(self) -> float:
        return sum(self.cpu_counts.values()) / max(self.checked, 1)

    def describe(self) -> str:
        """E.g. 'jpeg baseline 8-bit gray 90%, png 10%'."""
        return ", ".join(f"{label} {100 * n / max(self.checked, 1):.0f}%" for label, n in self.counts.most_common())


def census(paths: list[Path], gray_output: bool) -> FormatCensus:
    """Formats of the files at `paths`, by their headers. Missing or unreadable files
    are left to the loaders' own checks and check-data, and not counted."""
    counts, cpu_counts, checked = Counter(), Counter(), 0
    for path in paths:
        try:
            fmt = read_format(path)
        except OSError:
            continue
        checked += 1
        counts[fmt.label] += 1
        if decode_placement(fmt, gray_output) == CPU:
            cpu_counts[fmt.label] += 1
    return FormatCensus(counts, cpu_counts, checked)


STARTUP_SAMPLE = 256  # headers a run reads at start-up: a share to within a few percent
PREPARE_FIX = ("make a GPU-decodable copy with 'jrcl-fast prepare-images --config CONFIG --out DIR' (lossless "
               "JPEG 2000; or --format jpeg --max-side 256) and train with --set data.root=DIR")


def decode_notice(root: Path, rel_paths: list[str], gpu: bool, gray_output: bool,
                  sample: int = STARTUP_SAMPLE) -> str | None:
    """The one line a run prints at start-up when its images decode where they should
    not: on a GPU run, files DALI's mixed decoder leaves to the CPU; on a CPU run, a
    JPEG 2000 copy (an order of magnitude slower than PNG on the CPU). None when fine."""
    chosen = random.Random(0).sample(rel_paths, sample) if sample < len(rel_paths) else rel_paths
    found = census([root / rel for rel in chosen], gray_output)
    of = f" (a sample of {len(chosen)} of {len(rel_paths)} files)" if len(chosen) < len(rel_paths) else ""
    if gpu and found.cpu_share > 0:
        kinds = ", ".join(label for label, _ in found.cpu_counts.most_common())
        return (f"DALI decodes {found.cpu_share:.0%} of the training images on the CPU, not the GPU: {kinds}{of}; "
                f"{PREPARE_FIX}")
    j2k = found.counts["jpeg2000"] / max(found.checked, 1)
    if not gpu and j2k > 0:
        return (f"{j2k:.0%} of the training images are JPEG 2000{of}, which decodes on the CPU over 10x slower "
                "than PNG (docs/BENCHMARKS.md): a JPEG 2000 copy is for GPU runs; on the CPU, train on the originals")
    return None


def format_lines(found: FormatCensus) -> list[str]:
    """check-data's lines on formats: what the files of every split are, by their
    headers, and what a GPU run would decode on the CPU."""
    lines = [f"image formats (from file headers): {found.describe()}"]
    if found.cpu_share > 0:
        lines.append(f"a GPU run (DALI mixed decoder) decodes {found.cpu_share:.0%} of them on the CPU; {PREPARE_FIX}")
    return lines


MIB = 1 << 20
# fn.decoders.image settings per data set for the mixed (GPU) decoder; DALI 2.4's own
# defaults are hw_decoder_load 0.65, device/host padding 16/8 MiB per thread, no
# JPEG 2000 padding and no preallocation. A padding (bytes) preallocates a buffer per
# decoder thread big enough that no image of the data set reallocates it; the
# preallocation hints size the hardware decoder's buffers (A100/H100) up front.
#   NIH-CXR-LT: every image is 1024 x 1024 8-bit gray (a --max-side copy is smaller):
#     one decoded 3-plane 1024 x 1024 image is 3 MiB, so 4 MiB on the device; the
#     lossless JPEG 2000 copy is ~0.6 MiB a file and 1 MiB decoded, so 2 MiB each for
#     nvJPEG2000, which DALI otherwise allocates on the fly per image.
#   MIMIC-CXR-JPG: full-resolution gray JPEGs of about 2500 x 3000: a 3-plane decode
#     is ~22 MiB, past DALI's 16 MiB, so 32 MiB.
#   iNaturalist 2018: photos resized to at most 800 px a side: hints 800 x 800, and
#     2 MiB (an 800 x 800 RGB image is 1.9 MiB).
#   Places-LT: sizes depend on the download (256 px or >= 512 px short side): DALI's.
# hw_decoder_load stays DALI's until a GPU run measures it (benchmarks/gpu_session.sh,
# decode step: load 0 against the default); data.decoder.hw_decoder_load overrides it.
MIXED_DECODER_DEFAULTS: dict[str, dict[str, int | float]] = {
    "nih_cxr_lt": {"device_memory_padding": 4 * MIB, "device_memory_padding_jpeg2k": 2 * MIB,
                   "host_memory_padding_jpeg2k": 2 * MIB, "preallocate_width_hint": 1024,
                   "preallocate_height_hint": 1024},
    "mimic_cxr_lt": {"device_memory_padding": 32 * MIB},
    "inat2018": {"device_memory_padding": 2 * MIB, "preallocate_width_hint": 800, "preallocate_height_hint": 800},
}


def mixed_decoder_settings(dataset_name: str, overrides: DecoderConfig) -> dict[str, int | float]:
    """The keyword arguments a GPU run passes to fn.decoders.image: the data set's
    defaults, then every data.decoder key the config sets."""
    settings = dict(MIXED_DECODER_DEFAULTS.get(dataset_name, {}))
    for key, value in dataclasses.asdict(overrides).items():
        if value is None:
            continue
        if value < 0 or (key == "hw_decoder_load" and value > 1):
            bound = "from 0 to 1" if key == "hw_decoder_load" else "0 or more"
            raise UserError(f"data.decoder.{key} is {value}; it must be {bound}")
        settings[key] = value
    return settings
