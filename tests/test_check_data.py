"""check-data at a real data set's size: a wrong data.root stops in one sentence, many bad
files stay within 40 lines on screen with all of them in a file, decoding in worker
processes gives what one process gives, with a progress bar."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np
from helpers import REPO, run_cli
from PIL import Image
from rich.console import Console

from jrcl_fast.cli import main
from jrcl_fast.data.check_data import BAD_SHOWN, check_data
from jrcl_fast.data.fixtures import write_inat2018
from jrcl_fast.data.long_tailed_dataset import LongTailedDataset, Split

PLACES = str(REPO / "configs" / "places_lt.yaml")
MAX_LINES = 40


def test_a_wrong_root_stops_in_one_sentence_naming_it(tmp_path: Path) -> None:
    # iNat2018's shape without images: ~10% of the classes, every shot group
    root = write_inat2018(tmp_path / "inat", scale=0.1, seed=np.random.randint(1 << 30))
    done = run_cli("check-data", "--config", str(REPO / "configs" / "inat2018.yaml"), "--set", f"data.root={root}")
    assert done.returncode == 2
    screen = (done.stdout + done.stderr).strip().splitlines()
    assert len(screen) == 1, screen
    first = re.search(r'"file_name":"([^"]+)"', (root / "train2018.json").read_text()).group(1)
    assert screen[0].startswith(f"error: none of the first 64 images exists (e.g. {root / first}, entry 1 of ")
    assert f"data.root is {root}; point it at the folder that holds train_val2018/ (--set data.root=DIR)" in screen[0]


def write_places(root: Path, good: int, missing: int, corrupt: int, lead: int = 5) -> list[str]:
    """Places-LT lists whose train split has `good` images (the first `lead` of them
    first), then `missing` absent and `corrupt` broken ones in a random order (val and
    test: the first image). Returns the bad train file names in entry order."""
    rng = np.random.default_rng()
    kinds = ["good"] * lead + list(rng.permutation(["good"] * (good - lead) + ["missing"] * missing
                                                   + ["corrupt"] * corrupt))
    pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    names = [f"{k:05d}.jpg" for k in range(len(kinds))]
    for name, kind, k in zip(names, kinds, range(len(kinds))):
        if kind == "good":
            Image.fromarray(np.roll(pixels, k, axis=0)).save(root / name)
        elif kind == "corrupt":
            (root / name).write_bytes(b"\xff\xd8\xff" + rng.bytes(40))
    (root / "Places_LT_train.txt").write_text("".join(f"{name} {k % 365}\n" for k, name in enumerate(names)))
    for split in ("val", "test"):
        (root / f"Places_LT_{split}.txt").write_text(f"{names[0]} 0\n")
    return [name for name, kind in zip(names, kinds) if kind != "good"]


def test_many_bad_files_stay_within_40_lines_and_all_go_to_the_named_file(tmp_path: Path, capsys) -> None:
    bad = write_places(tmp_path, good=40, missing=25, corrupt=12)
    assert main(["check-data", "--config", PLACES, "--set", f"data.root={tmp_path}",
                 "--set", f"train.output_dir={tmp_path / 'run'}"]) == 2
    out, err = capsys.readouterr()
    screen = (out + err).strip().splitlines()
    assert len(screen) <= MAX_LINES, screen
    listed = [line for line in screen if re.match(r"  train entry \d+: ", line)]
    assert len(listed) == BAD_SHOWN
    bad_list = tmp_path / "run" / "bad_images.csv"
    assert f"all 37 bad entries: {bad_list}" in out and "... and 17 more" in out
    assert "25 missing and 12 corrupt of 79 images" in err and str(bad_list) in err
    with bad_list.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [Path(row["path"]).name for row in rows] == bad
    assert {row["problem"].split(" ")[0] for row in rows} == {"missing", "corrupt"}
    assert sum(row["problem"] == "missing" for row in rows) == 25
    # the screen shows the first 20 of the file's rows
    assert [line.split(": ")[1] for line in listed] == [row["path"] for row in rows[:BAD_SHOWN]]


def test_worker_processes_find_what_one_process_finds_with_a_progress_bar(tmp_path: Path) -> None:
    bad = write_places(tmp_path, good=300, missing=7, corrupt=9)  # more than one chunk of 256
    from jrcl_fast.data.filelist import read_file_list

    train = read_file_list(tmp_path / "Places_LT_train.txt", tmp_path)
    test = Split(tmp_path, train.paths[:5], train.labels[:5], "test list")
    dataset = LongTailedDataset("places_lt", [str(c) for c in range(365)], train, test)
    screen = io.StringIO()
    many = check_data(dataset, workers=2, console=Console(file=screen, force_terminal=True, width=100))
    one = check_data(dataset, workers=1)
    assert many.bad == one.bad and many.formats == one.formats and many.checked == one.checked == 321
    assert [Path(b.path).name for b in many.bad] == bad
    assert many.formats.checked == 300 + 9  # distinct files that exist: test's five are train's
    assert many.formats.counts["jpeg baseline 8-bit ycbcr"] == 300
    drawn = screen.getvalue()
    assert "decoding" in drawn and "images/s" in drawn and "316/316" in drawn  # each distinct file once


def test_a_clean_data_set_is_two_lines_and_writes_no_list(tmp_path: Path, capsys) -> None:
    write_places(tmp_path, good=6, missing=0, corrupt=0)
    assert main(["check-data", "--config", PLACES, "--set", f"data.root={tmp_path}",
                 "--set", f"train.output_dir={tmp_path / 'run'}"]) == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-2:] == ["places_lt (train, val, test): 8 images, 8 decoded, 0 missing, 0 corrupt",
                                             "image formats (from file headers): jpeg baseline 8-bit ycbcr 100%"]
    assert not err and not (tmp_path / "run").exists()
