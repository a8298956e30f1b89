"""prepare-images end to end (issue 22's "Done when"): a small NIH-CXR-LT copy of
1024 x 1024 grayscale PNGs in the published layout becomes a lossless JPEG 2000 copy
(checked pixel for pixel here again, independently of the command's own check) and a
256-px JPEG copy; both train one epoch with the DALI loader on the CPU, every prepared
file decodes on the GPU side and every PNG on the CPU side. Plus: resuming, the split
files of the other layouts, and what a GPU run and check-data say about formats."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli, tiny_config
from PIL import Image
from rich.console import Console
from test_benchmarks import load_benchmark
from test_data_adapters import gradient, write_inat

from jrcl_fast.cli import main
from jrcl_fast.config import DataConfig
from jrcl_fast.data.augment import augmentation_for
from jrcl_fast.data.catalog import load_dataset
from jrcl_fast.data.image_formats import CPU, GPU, decode_placement, read_format
from jrcl_fast.data.prepare_images import PrepareOptions, encode, prepare_images, second_decoder, verify
from jrcl_fast.data.sets.adapters import CXR_SPLITS, MIMIC_CXR_LT, NIH_CXR_LT
from jrcl_fast.errors import UserError

pytest.importorskip("nvidia.dali")

# The published header order of the NIH-CXR-LT split CSVs (the adapter maps columns by name).
NIH_HEADER = ["id", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
              "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
              "Pneumoperitoneum", "Pneumomediastinum", "Subcutaneous Emphysema", "Tortuous Aorta",
              "Calcification of the Aorta", "No Finding", "subject_id"]
ROWS_PER_SPLIT = {"train": 8, "balanced-val": 2, "test": 2, "balanced-test": 2}


def nih_fixture(root: Path, seed: int, side: int = 1024) -> list[Path]:
    """data.root of NIH-CXR-LT: the four split CSVs and images/<id>.png, side x side L
    (NIH's are 1024 x 1024)."""
    xray = load_benchmark("bench_decode.py").synthetic_xray
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    pngs, patient = [], 0
    for split, rows in ROWS_PER_SPLIT.items():
        with NIH_CXR_LT.csv_path(root, split).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(NIH_HEADER)
            for k in range(rows):
                patient += 1
                name = f"{patient:08d}_{k:03d}.png"
                hot = NIH_HEADER.index(NIH_CXR_LT.class_names[(patient * 7) % 20])
                writer.writerow([name, *("1" if c == hot else "0" for c in range(1, 21)), f"{patient:08d}"])
                Image.fromarray(xray(side, int(rng.integers(1 << 30))), mode="L").save(root / "images" / name)
                pngs.append(root / "images" / name)
    return pngs


def nih_config(tmp_path: Path, root: Path, name: str) -> Path:
    """configs/nih_cxr_lt.yaml cut to one epoch of a small random-weight network at 32 px."""
    folder = tmp_path / name
    folder.mkdir()
    return tiny_config(folder, root, base="nih_cxr_lt",
                       data={"image_size": 32, "loader": "dali", "num_workers": 2},
                       model={"backbone": "resnet18", "pretrained": False, "projection_dim": 16,
                              "projection_hidden_dim": 32},
                       train={"epochs": 1, "batch_size": 4, "threads": 2, "engine": "local",
                              "early_stop_patience": 0})


def prepare(config: Path, out: Path, *extra: str) -> dict:
    done = run_cli("prepare-images", "--config", str(config), "--out", str(out), *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "prepare-images.json").read_text()) | {"stdout": done.stdout}


def train_one_epoch(config: Path, root: Path) -> str:
    """Train on the copy at `root`; its stderr."""
    done = run_cli("train", "--config", str(config), "--set", f"data.root={root}",
                   "--set", f"train.output_dir={root.parent / ('run_' + root.name)}")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((root.parent / ("run_" + root.name) / "results.json").read_text())
    assert 0 <= results["balanced_accuracy"] <= 1 and results["selection"]
    return done.stderr


@pytest.mark.slow  # two prepare runs and two training runs, each a fresh interpreter
def test_nih_pngs_to_lossless_jpeg2000_and_256px_jpeg_train_on_dali(tmp_path: Path) -> None:
    root = tmp_path / "nih"
    pngs = nih_fixture(root, seed=int(np.random.default_rng().integers(1 << 30)))
    assert {decode_placement(read_format(p)) for p in pngs} == {CPU}
    config = nih_config(tmp_path, root, "cfg")

    lossless = prepare(config, tmp_path / "j2k", "--format", "jpeg2000")
    assert lossless["files"] == len(pngs) and lossless["converted"] == len(pngs)
    assert lossless["verified_lossless"] == len(pngs)
    assert lossless["verified_by"] == ["Pillow", "OpenCV"][:1 + (second_decoder() is not None)]
    assert "decodes" in lossless["stdout"] and "slower" in lossless["stdout"]  # a CPU run is told
    small = prepare(config, tmp_path / "jpeg256", "--format", "jpeg", "--quality", "90", "--max-side", "256")
    assert small["bytes_after"] < small["bytes_before"] / 10

    for out, suffix, side in ((tmp_path / "j2k", ".jp2", 1024), (tmp_path / "jpeg256", ".jpg", 256)):
        for split in CXR_SPLITS:  # the split files name the copies; ids keep their stem
            ids = [row["id"] for row in csv.DictReader(NIH_CXR_LT.csv_path(out, split).open())]
            original = [row["id"] for row in csv.DictReader(NIH_CXR_LT.csv_path(root, split).open())]
            assert ids == [Path(i).stem + suffix for i in original]
        copies = sorted((out / "images").iterdir())
        assert [p.name for p in copies] == sorted(Path(p).stem + suffix for p in [q.name for q in pngs])
        assert {decode_placement(read_format(p)) for p in copies} == {GPU}
        for png in pngs[:3]:
            with Image.open(out / "images" / (png.stem + suffix)) as copy, Image.open(png) as source:
                assert copy.size == (side, side) and copy.mode == "L"
                if suffix == ".jp2":  # pixel-exact, checked here by an independent decode of both files
                    assert np.array_equal(np.asarray(copy), np.asarray(source))
        stderr = train_one_epoch(config, out)
        # A CPU run on JPEG 2000 is told it decodes slowly there; on JPEG, nothing to say.
        assert ("100% of the training images are JPEG 2000" in stderr) == (suffix == ".jp2")


def test_a_rerun_skips_finished_files_and_redoes_a_missing_one(tmp_path: Path, capsys) -> None:
    """In this process (cli.main), to spare four interpreter start-ups."""
    root = tmp_path / "nih"
    nih_fixture(root, seed=1, side=256)
    config = str(nih_config(tmp_path, root, "cfg"))
    out = tmp_path / "copy"
    args = ["prepare-images", "--config", config, "--out", str(out), "--format", "jpeg", "--max-side", "64"]
    assert main(args) == 0
    victim = out / "images" / "00000001_000.jpg"
    victim.unlink()
    assert main(args) == 0
    again = json.loads((out / "prepare-images.json").read_text())
    assert again["skipped"] == again["files"] - 1 and again["converted"] == 1 and victim.is_file()
    assert not list(out.rglob(".*.jpg.*"))  # no temp file left behind
    capsys.readouterr()
    assert main(args[:-2]) == 2  # the same folder, another --max-side
    assert "holds a copy made with max_side 64" in capsys.readouterr().err
    for data_root, formats, cpu in ((root, "png 100%", True), (out, "jpeg baseline 8-bit gray 100%", False)):
        assert main(["check-data", "--config", config, "--set", f"data.root={data_root}"]) == 0
        checked = capsys.readouterr().out
        assert f"image formats (from file headers): {formats}" in checked
        assert ("decodes 100% of them on the CPU" in checked) == cpu


def write_places(root: Path) -> None:
    """Places-LT lists: '/<letter>/<scene>/<n>.jpg label' lines, RGB JPEGs under data.root."""
    for split in ("train", "val", "test"):
        lines = []
        for k in range(3):
            rel = f"/a/abbey/{split}{k:07d}.jpg"
            (root / rel[1:]).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(gradient(96, 128)).save(root / rel[1:], quality=90)
            lines.append(f"{rel} {k}\n")
        (root / f"Places_LT_{split}.txt").write_text("".join(lines))


def write_mimic(root: Path) -> None:
    """MIMIC-CXR-LT CSVs (path column: files/pXX/...jpg) and grayscale JPEGs."""
    header = ["subject_id", "study_id", "dicom_id", "path", *MIMIC_CXR_LT.class_names]
    for split in CXR_SPLITS:
        with MIMIC_CXR_LT.csv_path(root, split).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for k in range(2):
                rel = f"files/p10/p1000{k}/s5000{k}/{split}-{k}.jpg"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(gradient(120, 100, 1), mode="L").save(root / rel, quality=90)
                writer.writerow([f"1000{k}", f"5000{k}", f"{split}-{k}", rel, *("1" if c == k else "0" for c in range(19))])


@pytest.mark.parametrize("name,write,max_side,suffix", [
    ("places_lt", write_places, 64, ".jp2"),
    ("inat2018", write_inat, 64, ".jp2"),
    ("mimic_cxr_lt", write_mimic, 64, ".jp2"),
    ("mimic_cxr_lt", write_mimic, None, ".jpg"),  # already GPU-decodable, not resized: copied byte for byte
])
def test_split_files_of_every_layout_name_the_copies(tmp_path: Path, name: str, write, max_side, suffix) -> None:
    root, out = tmp_path / "data", tmp_path / "copy"
    root.mkdir()
    write(root)
    dataset = load_dataset(DataConfig(name=name, root=str(root)))
    options = PrepareOptions(out, "jpeg2000", 95, max_side, augmentation_for(name).grayscale)
    prepare_images(dataset, root, options, workers=2, console=Console(quiet=True))
    copy = load_dataset(DataConfig(name=name, root=str(out)))  # the rewritten split files load as published
    for split_name, split in dataset.splits().items():
        copied = copy.splits()[split_name]
        assert copied.paths == [str(Path(p).with_suffix(suffix)) for p in split.paths]
        assert copied.labels.tolist() == split.labels.tolist()
        for rel, new in zip(split.paths, copied.paths):
            assert decode_placement(read_format(out / new), options.gray) == GPU
            if max_side is None:
                assert (out / new).read_bytes() == (root / rel).read_bytes()
            else:
                with Image.open(out / new) as img:
                    assert max(img.size) == max_side


@pytest.mark.parametrize("culprit", ["Pillow", "OpenCV"])
def test_a_lossless_copy_that_differs_by_one_pixel_is_refused(culprit: str, monkeypatch: pytest.MonkeyPatch) -> None:
    source = Image.fromarray(np.random.default_rng().integers(0, 256, (40, 50), dtype=np.uint8), mode="L")
    options = PrepareOptions(Path("unused"), "jpeg2000", gray=True)
    data = encode(source, options)
    assert verify(data, source, "x.png", lossless=True) == float("inf")
    poisoned = np.asarray(source).copy()
    poisoned[7, 9] ^= 1
    if culprit == "Pillow":  # the copy is not what the source was
        expected = Image.fromarray(poisoned, mode="L")
    else:  # Pillow reads it right, the second decoder does not
        expected = source
        monkeypatch.setattr("jrcl_fast.data.prepare_images.second_decoder", lambda: lambda _: poisoned)
    with pytest.raises(UserError, match=rf"x.png: the lossless copy does not decode \({culprit}\)"):
        verify(data, expected, "x.png", lossless=True)
