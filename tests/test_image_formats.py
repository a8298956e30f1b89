"""Decode placement from header bytes (image_formats.py), on files whose properties are
known independently of the parser: Pillow writes baseline, progressive, CMYK and
YCCK-free JPEG, PNG, JPEG 2000, TIFF, BMP, WebP and GIF with the options that make
them so; the frames Pillow cannot write (12-bit SOF1, arithmetic SOF9, lossless SOF3)
are assembled here marker by marker from ITU-T T.81. Then, per adapter, tiny files in
the data set's published layout, and the start-up line of a GPU run (the GPU decision
forced, as on a GPU machine), and check-data's format report."""

from __future__ import annotations

import dataclasses
import io
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jrcl_fast.config import DecoderConfig, load_config
from jrcl_fast.data.augment import AUGMENTATIONS
from jrcl_fast.data.image_formats import (
    CPU,
    GPU,
    MIXED_DECODER_DEFAULTS,
    census,
    decode_placement,
    hardware_decodable,
    mixed_decoder_settings,
    read_format,
    sniff,
)
from jrcl_fast.data.loader_contract import TrainSpec
from jrcl_fast.data.long_tailed_dataset import Split
from jrcl_fast.errors import UserError

rng = np.random.default_rng()


def picture(mode: str, size: int = 24) -> Image.Image:
    """A fresh random picture in `mode` (noise: nothing in the test depends on its look)."""
    channels = {"L": 1, "RGB": 3, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, (size, size + 3, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(), mode=mode)


def saved(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def jpeg_frame(sof: int, precision: int, components: int, adobe_transform: int | None = None) -> bytes:
    """SOI, JFIF APP0, optional Adobe APP14, a quantisation table, the SOFn frame header
    (T.81 B.2.2: P, Y, X, Nf, then Ci Hi|Vi Tqi per component) and an SOS: the header a
    decoder reads before any entropy-coded data."""
    out = b"\xff\xd8" + segment(0xE0, b"JFIF\x00\x01\x02\x00\x00\x01\x00\x01\x00\x00")
    if adobe_transform is not None:
        out += segment(0xEE, b"Adobe" + struct.pack(">HHHB", 100, 0, 0, adobe_transform))
    out += segment(0xDB, bytes([0]) + bytes(range(1, 65)))
    comps = b"".join(bytes([i + 1, 0x11, 0]) for i in range(components))
    out += segment(sof, struct.pack(">BHHB", precision, 16, 16, components) + comps)
    return out + segment(0xDA, bytes([components]) + b"".join(bytes([i + 1, 0]) for i in range(components)) + b"\x00\x3f\x00")


# (file bytes, expected label, expected placement for gray output); Pillow's options fix the property.
def pillow_cases() -> list[tuple[bytes, str, str]]:
    gray, rgb, cmyk = picture("L"), picture("RGB"), picture("CMYK")
    return [
        (saved(gray, "JPEG", quality=90), "jpeg baseline 8-bit gray", GPU),
        (saved(rgb, "JPEG", quality=90), "jpeg baseline 8-bit ycbcr", GPU),
        (saved(rgb, "JPEG", quality=90, progressive=True), "jpeg progressive 8-bit ycbcr", GPU),
        (saved(gray, "JPEG", quality=90, progressive=True), "jpeg progressive 8-bit gray", GPU),
        (saved(cmyk, "JPEG", quality=90), "jpeg baseline 8-bit cmyk", CPU),  # Pillow writes Adobe APP14, transform 0
        (saved(gray, "PNG"), "png", CPU),
        (saved(rgb, "PNG"), "png", CPU),
        (saved(gray, "JPEG2000", irreversible=False), "jpeg2000", GPU),  # JP2 box file
        (saved(rgb, "JPEG2000", irreversible=False, no_jp2=True), "jpeg2000", GPU),  # raw codestream
        (saved(gray, "TIFF"), "tiff", CPU),
        (saved(rgb, "BMP"), "bmp", CPU),
        (saved(rgb, "WEBP", lossless=True), "webp", CPU),
        (saved(gray, "GIF"), "gif", CPU),
        (saved(gray, "PPM"), "pnm", CPU),
    ]


def test_pillow_written_files_are_placed_by_their_encoding() -> None:
    for data, label, where in pillow_cases():
        fmt = sniff(data)
        assert (fmt.label, decode_placement(fmt)) == (label, where), label


@pytest.mark.parametrize("sof,precision,components,adobe,label,where", [
    (0xC0, 8, 1, None, "jpeg baseline 8-bit gray", GPU),
    (0xC1, 8, 3, None, "jpeg extended 8-bit ycbcr", GPU),
    (0xC1, 12, 1, None, "jpeg extended 12-bit gray", CPU),
    (0xC2, 12, 3, None, "jpeg progressive 12-bit ycbcr", CPU),
    (0xC3, 16, 1, None, "jpeg lossless 16-bit gray", GPU),
    (0xC9, 8, 3, None, "jpeg arithmetic extended 8-bit ycbcr", CPU),
    (0xCA, 8, 1, None, "jpeg arithmetic progressive 8-bit gray", CPU),
    (0xCB, 8, 1, None, "jpeg arithmetic lossless 8-bit gray", CPU),
    (0xC7, 8, 1, None, "jpeg differential lossless 8-bit gray", CPU),
    (0xC0, 8, 4, 2, "jpeg baseline 8-bit ycck", CPU),
    (0xC0, 8, 4, 0, "jpeg baseline 8-bit cmyk", CPU),
    (0xC0, 8, 3, 0, "jpeg baseline 8-bit rgb", CPU),
    (0xC0, 8, 3, 1, "jpeg baseline 8-bit ycbcr", GPU),
])
def test_hand_made_frames_are_placed_by_their_sof_marker(sof, precision, components, adobe, label, where) -> None:
    fmt = sniff(jpeg_frame(sof, precision, components, adobe))
    assert (fmt.label, decode_placement(fmt)) == (label, where)
    assert hardware_decodable(fmt) == (where == GPU and sof == 0xC0)


def test_lossless_jpeg_goes_to_the_gpu_only_for_gray_output() -> None:
    lossless = sniff(jpeg_frame(0xC3, 12, 1))
    assert decode_placement(lossless, gray_output=True) == GPU
    assert decode_placement(lossless, gray_output=False) == CPU


def test_a_sof_beyond_a_large_exif_block_is_found(tmp_path: Path) -> None:
    """APP1 can be 64 KiB; read_format reads on past its first 64 KiB to the SOF."""
    frame = jpeg_frame(0xC2, 8, 3)
    exif = b"".join(segment(0xE1, b"Exif\x00\x00" + bytes(60000)) for _ in range(2))
    path = tmp_path / "big_exif.jpg"
    path.write_bytes(frame[:2] + exif + frame[2:])
    assert read_format(path).label == "jpeg progressive 8-bit ycbcr"
    path.write_bytes(frame[:2] + exif)  # cut off before its frame header
    assert read_format(path).label == "jpeg without a frame header" and decode_placement(read_format(path)) == CPU


def test_extensions_are_not_trusted(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(saved(picture("L"), "PNG"))
    (tmp_path / "b.png").write_bytes(saved(picture("L"), "JPEG"))
    (tmp_path / "c.jp2").write_bytes(b"not an image at all")
    assert [read_format(tmp_path / n).name for n in ("a.jpg", "b.png", "c.jp2")] == ["png", "jpeg", "unknown"]
    assert decode_placement(read_format(tmp_path / "a.jpg")) == CPU


# Each data set's published layout: where its images live and in which format.
def nih_layout(root: Path) -> list[Path]:  # images/<id>.png, 1024 x 1024 8-bit grayscale PNG
    return [root / "images" / f"0000{i}_000.png" for i in range(3)]


def mimic_layout(root: Path) -> list[Path]:  # MIMIC-CXR-JPG: files/pXX/pSUBJECT/sSTUDY/DICOM.jpg, gray JPEG
    return [root / "files" / "p10" / f"p1000032{i}" / "s50414267" / f"02aa804e-bde0afdd-{i}.jpg" for i in range(3)]


def inat_layout(root: Path) -> list[Path]:  # train_val2018/<supercategory>/<category id>/<hash>.jpg, RGB JPEG
    return [root / "train_val2018" / "Plantae" / "7477" / f"3b60c9486db1d2ee875f11a669fbde4{i}.jpg" for i in range(3)]


def places_layout(root: Path) -> list[Path]:  # data_256/<letter>/<scene>/<number>.jpg, RGB JPEG
    return [root / "a" / "abbey" / f"0000000{i}.jpg" for i in range(3)]


@pytest.mark.parametrize("layout,mode,fmt,gray,where", [
    (nih_layout, "L", "PNG", True, CPU),
    (mimic_layout, "L", "JPEG", True, GPU),
    (inat_layout, "RGB", "JPEG", False, GPU),
    (places_layout, "RGB", "JPEG", False, GPU),
])
def test_each_data_set_as_published_decodes_where_expected(tmp_path: Path, layout, mode: str, fmt: str,
                                                          gray: bool, where: str) -> None:
    paths = layout(tmp_path)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        picture(mode).save(path, fmt)
    found = census(paths, gray_output=gray)
    assert found.checked == len(paths)
    assert found.cpu_share == (1.0 if where == CPU else 0.0)


def test_census_counts_a_mix_and_leaves_missing_files_out(tmp_path: Path) -> None:
    paths = []
    for i in range(40):
        path = tmp_path / f"{i}.img"
        path.write_bytes(saved(picture("L"), "PNG" if i % 4 == 0 else "JPEG"))
        paths.append(path)
    found = census([*paths, tmp_path / "missing.png"], gray_output=True)
    assert found.checked == 40 and found.counts == {"png": 10, "jpeg baseline 8-bit gray": 30}
    assert found.cpu_share == 0.25 and found.describe() == "jpeg baseline 8-bit gray 75%, png 25%"


def mixed_split(root: Path, entries: int, pngs: int) -> Split:
    """`entries` split entries cycling over 8 files: `pngs` PNGs, the rest JPEG 2000."""
    root.mkdir(exist_ok=True)
    files = [f"{i}.png" if i < pngs else f"{i}.jp2" for i in range(8)]
    for name in files:
        picture("L").save(root / name, "PNG" if name.endswith(".png") else "JPEG2000")
    paths = [files[i % 8] for i in range(entries)]
    return Split(root, paths, np.zeros(entries, dtype=np.int64), str(root / "train.csv"))


def start_up_lines(split: Split, gpu: bool, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> list[str]:
    """What DaliTrainLoader prints when built on a machine whose GPU decision is `gpu`."""
    pytest.importorskip("nvidia.dali")
    from jrcl_fast.data import dali_loader

    monkeypatch.setattr(dali_loader, "dali_on_gpu", lambda: gpu)  # the decision a GPU machine makes
    spec = TrainSpec(split=split, image_size=8, augmentation=AUGMENTATIONS["xray"], batch_size=2, num_views=1,
                     sampler="instance", seed=0)
    dali_loader.DaliTrainLoader(spec)
    return capfd.readouterr().err.splitlines()


def test_a_gpu_run_on_pngs_says_share_format_and_fix_in_one_line(tmp_path: Path, monkeypatch, capfd) -> None:
    split = mixed_split(tmp_path, entries=437_513, pngs=2)  # iNat's entry count: a sample is read, not all
    (line,) = start_up_lines(split, True, monkeypatch, capfd)
    share = int(re.search(r"decodes (\d+)% of the training images on the CPU", line).group(1))
    assert 15 <= share <= 35  # 2 of 8 files are PNG: 25% up to the sample's error
    assert "png" in line and "sample of 256 of 437513" in line and "prepare-images" in line
    (cpu_line,) = start_up_lines(split, False, monkeypatch, capfd)
    assert re.match(r"note: \d+% of the training images are JPEG 2000.*slower", cpu_line)


def test_a_gpu_run_on_gpu_decodable_files_and_a_cpu_run_on_pngs_say_nothing(tmp_path, monkeypatch, capfd) -> None:
    assert start_up_lines(mixed_split(tmp_path / "j2k", 16, pngs=0), True, monkeypatch, capfd) == []
    assert start_up_lines(mixed_split(tmp_path / "png", 16, pngs=8), False, monkeypatch, capfd) == []


def test_decoder_settings_are_dali_arguments_and_the_config_overrides_them(tmp_path: Path) -> None:
    dali = pytest.importorskip("nvidia.dali.backend")
    accepted = set(dali.GetSchema("decoders__Image").GetArgumentNames())
    assert {f.name for f in dataclasses.fields(DecoderConfig)} <= accepted  # every config key is DALI's
    for name, settings in MIXED_DECODER_DEFAULTS.items():
        assert set(settings) <= accepted, name
    nih = mixed_decoder_settings("nih_cxr_lt", DecoderConfig())
    assert nih["preallocate_width_hint"] == nih["preallocate_height_hint"] == 1024  # NIH's image size
    assert mixed_decoder_settings("places_lt", DecoderConfig()) == {}  # DALI's own
    config = tmp_path / "c.yaml"
    config.write_text("data: {name: nih_cxr_lt, root: /data/nih}\n")
    cfg = load_config(config, ["data.decoder.hw_decoder_load=0.8", "data.decoder.preallocate_width_hint=512"])
    merged = mixed_decoder_settings(cfg.data.name, cfg.data.decoder)
    assert merged == {**nih, "hw_decoder_load": 0.8, "preallocate_width_hint": 512}
    with pytest.raises(UserError, match=r"data.decoder.hw_decoder_load is 1.5; it must be from 0 to 1"):
        mixed_decoder_settings("nih_cxr_lt", DecoderConfig(hw_decoder_load=1.5))


def test_a_gpu_decode_gets_the_settings_and_a_cpu_decode_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mixed decoder cannot be built without a GPU: record what decode() asks DALI for."""
    pytest.importorskip("nvidia.dali")
    from jrcl_fast.data import dali_loader

    calls = []
    monkeypatch.setattr(dali_loader.fn.decoders, "image", lambda encoded, **kwargs: calls.append(kwargs))
    settings = {"hw_decoder_load": 0.7, "device_memory_padding": 123}
    dali_loader.decode(None, AUGMENTATIONS["xray"], True, settings)
    dali_loader.decode(None, AUGMENTATIONS["xray"], False, settings)
    assert calls[0]["device"] == "mixed" and settings.items() <= calls[0].items()
    assert calls[1]["device"] == "cpu" and not set(settings) & set(calls[1])
