"""Adapters on real-format label files, and check-data on good and bad images.

The CXR-LT tests on real data read the published CSVs in place from
../shared/data/cxr-lt/ and skip when that folder is absent; the CXR-LT bad-input
cases, iNaturalist and Places-LT write their fixtures here in the published formats.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jrcl_fast.config import DataConfig
from jrcl_fast.data.augment import augmentation_for
from jrcl_fast.data.catalog import load_dataset
from jrcl_fast.data.check_data import check_data
from jrcl_fast.data.long_tailed_dataset import LongTailedDataset, Split
from jrcl_fast.data.sets.adapters import CXR_SPLITS, MIMIC_CXR_LT, NIH_CXR_LT, read_cxr_csv
from jrcl_fast.errors import UserError

CXR_DIR = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cxr-lt").resolve()
needs_cxr = pytest.mark.skipif(not CXR_DIR.is_dir(), reason=f"published CXR-LT CSVs not found at {CXR_DIR}")


def gradient(height: int, width: int, channels: int = 3) -> np.ndarray:
    """A smooth test picture: decoders and resamplers agree on it to a grey level or so."""
    y, x = np.mgrid[0:height, 0:width]
    planes = [x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), 128 + 100 * np.sin(x / 7.0)]
    return np.rint(np.stack(planes[:channels], axis=-1)).astype(np.uint8).squeeze()


def cxr_root(tmp_path: Path, spec, train_from: str) -> Path:
    """A data root holding the published CSVs by link (the train CSV is not published
    here, so another split stands in) and placeholder images for balanced-val."""
    root = tmp_path / spec.name
    root.mkdir()
    for split, source in (("train", train_from), ("balanced-val", "balanced-val"), ("test", "balanced-test"),
                          ("balanced-test", "balanced-test")):
        spec.csv_path(root, split).symlink_to(spec.csv_path(CXR_DIR, source))
    val = read_cxr_csv(spec.csv_path(root, "balanced-val"), spec, root)
    for rel in val.paths:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gradient(16, 16, 1), mode="L").save(root / rel)
    return root


@needs_cxr
def test_nih_test_csv_class_counts_match_the_published_table() -> None:
    split = read_cxr_csv(NIH_CXR_LT.csv_path(CXR_DIR, "test"), NIH_CXR_LT, CXR_DIR)
    counts = dict(zip(NIH_CXR_LT.class_names, np.bincount(split.labels, minlength=20).tolist()))
    assert len(split) == 20279
    assert counts["No Finding"] == 13055 and counts["Infiltration"] == 2251 and counts["Effusion"] == 929
    assert counts["Hernia"] == 40 and counts["Pneumomediastinum"] == 33
    assert split.paths[0] == "images/00000003_000.png" and split.labels[0] == NIH_CXR_LT.class_names.index("Hernia")


@needs_cxr
@pytest.mark.parametrize("spec, train_from", [(NIH_CXR_LT, "balanced-test"), (MIMIC_CXR_LT, "balanced-test")])
def test_cxr_load_dataset(tmp_path: Path, spec, train_from: str) -> None:
    root = cxr_root(tmp_path, spec, train_from)
    dataset = load_dataset(DataConfig(name=spec.name, root=str(root)))
    assert dataset.class_names == list(spec.class_names) and augmentation_for(dataset.name).grayscale
    assert dataset.normal_classes == [0] and dataset.class_names[0] == "No Finding"
    assert np.bincount(dataset.val.labels).tolist() == [15] * len(spec.class_names)
    assert np.bincount(dataset.train.labels).tolist() == [30] * len(spec.class_names)
    if spec is NIH_CXR_LT:
        groups = dataset.shot_groups
        assert [len(groups[g]) for g in ("many", "medium", "few")] == [7, 10, 3]
        assert dataset.class_names[groups["few"][0]] == "Hernia"
    else:
        assert dataset.shot_groups is None
        assert dataset.val.paths[0].startswith("files/p")
    val_only = LongTailedDataset(spec.name, dataset.class_names, dataset.val, dataset.val)
    assert check_data(val_only).ok


def write_cxr_csv(root: Path, spec, split: str = "balanced-val", edit=None) -> Path:
    """A valid split CSV in spec's published layout where the adapter looks for it, one
    row per class in benchmark order (line k + 2 is labelled spec.class_names[k]), and a
    placeholder image per row. The class columns are sorted by name, not in benchmark
    order (as in the published files), so reading must map them by name. edit(spec,
    header, rows) -> (header, rows) breaks the file before it is written."""
    classes = sorted(spec.class_names)
    header = ["id", *classes, "subject_id"] if spec is NIH_CXR_LT else [*spec.id_columns, *classes]
    rows = []
    for k, name in enumerate(spec.class_names):
        subject, study, dicom = f"{10000001 + k}", f"{50000001 + k}", f"{k:08x}-0000"
        ids = {"id": f"{subject}_000.png", "subject_id": subject, "study_id": study, "dicom_id": dicom,
               "path": f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"}
        rows.append([ids[c] if c in ids else str(int(c == name)) for c in header])
        image = root / spec.image_folder / ids[spec.path_column]
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gradient(16, 16, 1), mode="L").save(image)
    if edit is not None:
        header, rows = edit(spec, header, rows)
    path = spec.csv_path(root, split)
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    return path


@pytest.mark.parametrize("spec", [NIH_CXR_LT, MIMIC_CXR_LT], ids=lambda spec: spec.name)
def test_synthetic_cxr_csvs_load(tmp_path: Path, spec) -> None:
    """The fixture the bad cases break is itself valid, so each bad case fails for its edit."""
    for split in CXR_SPLITS:
        write_cxr_csv(tmp_path, spec, split)
    dataset = load_dataset(DataConfig(name=spec.name, root=str(tmp_path)))
    assert dataset.val.labels.tolist() == list(range(len(spec.class_names)))
    assert list(dataset.splits()) == ["train", "val", "test", "balanced-test"]
    assert dataset.val.paths[2].endswith("10000003_000.png" if spec is NIH_CXR_LT else "/s50000003/00000002-0000.jpg")
    assert check_data(dataset).ok


def _drop(header: list[str], rows: list[list[str]], column: str) -> tuple[list[str], list[list[str]]]:
    i = header.index(column)
    return header[:i] + header[i + 1:], [row[:i] + row[i + 1:] for row in rows]


def _set(header: list[str], rows: list[list[str]], line: int, column: str, value: str):
    rows[line - 2][header.index(column)] = value
    return header, rows


@pytest.mark.parametrize("spec", [NIH_CXR_LT, MIMIC_CXR_LT], ids=lambda spec: spec.name)
@pytest.mark.parametrize("edit, message", [
    (lambda s, h, r: _drop(h, r, "Edema"), "line 1: column 'Edema' is missing; a {name} split needs columns "),
    (lambda s, h, r: _drop(h, r, s.path_column), "line 1: column '{path}' is missing; "),
    (lambda s, h, r: _set(h, r, 4, "Edema", "1"),
     "line 4: a single-label row needs exactly one 1 among the {n} class columns, found 2 ({c2}, Edema)"),
    (lambda s, h, r: _set(h, r, 3, s.class_names[1], "0"),
     "line 3: a single-label row needs exactly one 1 among the {n} class columns, found 0 (none)"),
    (lambda s, h, r: _set(h, r, 5, "Edema", "yes"), "line 5: column 'Edema' is 'yes'; expected 0 or 1"),
    (lambda s, h, r: (h, r[:2] + [r[2][:-1]] + r[3:]), "line 4: {short} fields, expected {fields} as in the header"),
], ids=["no-class-column", "no-path-column", "two-ones", "no-one", "not-0-or-1", "short-row"])
def test_cxr_bad_csv(tmp_path: Path, spec, edit, message: str) -> None:
    path = write_cxr_csv(tmp_path, spec, edit=edit)
    fields = len(spec.id_columns) + len(spec.class_names)
    expected = f"{path} " + message.format(name=spec.name, path=spec.path_column, n=len(spec.class_names),
                                           c2=spec.class_names[2], short=fields - 1, fields=fields)
    with pytest.raises(UserError, match=re.escape(expected)):
        read_cxr_csv(path, spec, tmp_path)


@pytest.mark.parametrize("spec", [NIH_CXR_LT, MIMIC_CXR_LT], ids=lambda spec: spec.name)
def test_cxr_missing_csvs_are_named_at_once(tmp_path: Path, spec) -> None:
    write_cxr_csv(tmp_path, spec, "balanced-val")
    with pytest.raises(UserError) as caught:
        load_dataset(DataConfig(name=spec.name, root=str(tmp_path)))
    prefix = spec.name.replace("_", "-")
    assert str(caught.value).startswith(
        f"data.root {tmp_path} lacks {prefix}_single-label_train.csv, {prefix}_single-label_test.csv, "
        f"{prefix}_single-label_balanced-test.csv; it must hold the four {spec.name} split CSVs")


@pytest.mark.parametrize("name, files", [("inat2018", ["train2018.json", "val2018.json"]),
                                         ("places_lt", ["Places_LT_train.txt", "Places_LT_val.txt",
                                                        "Places_LT_test.txt"])])
def test_missing_label_files_are_named_at_once(tmp_path: Path, name: str, files: list[str]) -> None:
    with pytest.raises(UserError, match=re.escape(f"data.root {tmp_path} lacks {', '.join(files)}; it must hold")):
        load_dataset(DataConfig(name=name, root=str(tmp_path)))


def write_inat(root: Path, train_images: int = 6) -> None:
    """iNaturalist 2018 layout: COCO-style train2018.json / val2018.json, images under
    train_val2018/<supercategory>/<category id>/, with non-contiguous category ids."""
    categories = [{"id": cid, "name": f"species {cid}", "supercategory": "Plantae"} for cid in (7, 2, 40)]
    for name, count, offset in (("train2018.json", train_images, 0), ("val2018.json", 3, 100)):
        images, annotations = [], []
        for k in range(count):
            cid = (7, 2, 40)[k % 3]
            rel = f"train_val2018/Plantae/{cid}/{offset + k:04d}.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(gradient(600, 800)).save(root / rel, quality=90)  # iNat-like size
            images.append({"id": offset + k, "file_name": rel, "width": 800, "height": 600})
            annotations.append({"id": offset + k, "image_id": offset + k, "category_id": cid})
        (root / name).write_text(json.dumps({"images": images, "annotations": annotations,
                                             "categories": categories}, indent=1))


def test_inat_load_dataset(tmp_path: Path) -> None:
    write_inat(tmp_path)
    dataset = load_dataset(DataConfig(name="inat2018", root=str(tmp_path)))
    assert dataset.class_names == ["species 2", "species 7", "species 40"]  # sorted by category id
    assert dataset.class_ids == [2, 7, 40]
    assert dataset.train.labels.tolist() == [1, 0, 2, 1, 0, 2] and len(dataset.test) == 3
    assert check_data(dataset).ok


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["annotations"][1].update(category_id=99), "annotations entry 2 has category_id 99"),
    (lambda d: d["annotations"].pop(), "images entry 3 .id 102. has no annotation"),
    (lambda d: d.pop("categories"), "key 'categories' is missing"),
    (lambda d: d["images"][0].pop("file_name"), "images entry 1 .* expected an object with id, file_name"),
])
def test_inat_bad_json(tmp_path: Path, edit, message: str) -> None:
    write_inat(tmp_path)
    path = tmp_path / "val2018.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=message):
        load_dataset(DataConfig(name="inat2018", root=str(tmp_path)))


def test_inat_invalid_json_names_the_line(tmp_path: Path) -> None:
    write_inat(tmp_path)
    (tmp_path / "val2018.json").write_text('{\n "images": [\n  {"id": 1,}\n ]\n}')
    with pytest.raises(UserError, match=r"val2018.json line 3: not valid JSON"):
        load_dataset(DataConfig(name="inat2018", root=str(tmp_path)))


def test_places_lt_still_loads(tmp_path: Path) -> None:
    for split in ("train", "val", "test"):
        lines = []
        for k in range(4):
            rel = f"data_256/{split}/{k}.jpg"
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(gradient(256, 256)).save(tmp_path / rel)
            lines.append(f"{rel} {k * 100}\n")
        (tmp_path / f"Places_LT_{split}.txt").write_text("".join(lines))
    dataset = load_dataset(DataConfig(name="places_lt", root=str(tmp_path)))
    assert dataset.num_classes == 365 and dataset.train.labels.tolist() == [0, 100, 200, 300]
    assert check_data(dataset).checked == 12


def test_places_lt_classes_are_named_by_their_scene_folders(tmp_path: Path) -> None:
    """Places-LT lists name train images by scene folder (/a/abbey/..., sub-scenes as
    /a/arena/hockey/...) and test images by a flat Places365 val name."""
    train = {0: ["/a/abbey/00000001.jpg", "/a/abbey/00000002.jpg"], 9: ["/a/arena/hockey/00000003.jpg"],
             364: ["/y/youth_hostel/00000004.jpg"]}
    lines = [f"{rel} {label}\n" for label, rels in train.items() for rel in rels]
    (tmp_path / "Places_LT_train.txt").write_text("".join(lines))
    for split in ("val", "test"):
        (tmp_path / f"Places_LT_{split}.txt").write_text("val_256/Places365_val_00000001.jpg 9\n")
    for rel in [rel for rels in train.values() for rel in rels] + ["val_256/Places365_val_00000001.jpg"]:
        (tmp_path / rel.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gradient(32, 32)).save(tmp_path / rel.lstrip("/"))
    dataset = load_dataset(DataConfig(name="places_lt", root=str(tmp_path)))
    names = dataset.class_names
    assert (names[0], names[9], names[364], names[1], len(names)) == ("abbey", "arena/hockey", "youth_hostel", "1", 365)
    assert check_data(dataset).ok  # the leading / is relative to data.root


def test_places_lt_classes_whose_paths_disagree_or_say_nothing_keep_their_number() -> None:
    from jrcl_fast.data.sets.adapters import places_class_names

    paths = ["a/abbey/1.jpg", "b/bakery/2.jpg", "a/abbey/3.jpg", "flat_4.jpg", "c/canyon/5.jpg"]
    split = Split(Path("/data"), paths, np.array([0, 0, 1, 2, 3]), "Places_LT_train.txt")
    names = places_class_names(split)
    assert names[:5] == ["0", "abbey", "2", "canyon", "4"]


def test_check_data_lists_missing_truncated_and_corrupt_files(tmp_path: Path) -> None:
    from jrcl_fast.data.filelist import read_file_list

    Image.fromarray(gradient(64, 80)).save(tmp_path / "rgb.jpg")
    Image.fromarray(gradient(64, 80, 1), mode="L").save(tmp_path / "gray.png")
    Image.fromarray(gradient(64, 80, 1).astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    full = (tmp_path / "rgb.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (tmp_path / "noise.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    names = ["rgb.jpg", "gray.png", "gray16.png", "truncated.jpg", "noise.png", "gone.png"]
    (tmp_path / "list.txt").write_text("".join(f"{n} {i % 2}\n" for i, n in enumerate(names)))
    split = read_file_list(tmp_path / "list.txt", tmp_path)
    report = check_data(LongTailedDataset("places_lt", ["a", "b"], split, split), workers=2)
    assert report.checked == 12 and not report.ok
    train_bad = [(b.entry, Path(b.path).name, b.reason.split(" ")[0]) for b in report.bad if b.split == "train"]
    assert train_bad == [(4, "truncated.jpg", "corrupt"), (5, "noise.png", "corrupt"), (6, "gone.png", "missing")]
    assert report.lines()[0] == "places_lt (train, test): 12 images, 6 decoded, 2 missing, 4 corrupt"
    with pytest.raises(UserError, match=re.escape(f"list.txt: entry 6 ({tmp_path / 'gone.png'}) is missing; fix")):
        split.check_files_exist()
    # a rank checks its own share of the entries: entry 6 belongs to rank 1 of 2
    split.check_files_exist(np.arange(0, 6, 2))
    with pytest.raises(UserError, match="entry 6 "):
        split.check_files_exist(np.arange(1, 6, 2))


def test_check_data_command(tmp_path: Path, capsys) -> None:
    from jrcl_fast.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "places_lt.yaml"
    for split in ("train", "val", "test"):
        Image.fromarray(gradient(32, 32)).save(tmp_path / f"{split}.jpg")
        (tmp_path / f"Places_LT_{split}.txt").write_text(f"{split}.jpg 3\n")
    assert main(["check-data", "--config", str(config), "--set", f"data.root={tmp_path}"]) == 0
    (tmp_path / "val.jpg").write_bytes(b"not an image")
    (tmp_path / "test.jpg").unlink()
    assert main(["check-data", "--config", str(config), "--set", f"data.root={tmp_path}"]) == 2
    out, err = capsys.readouterr()
    assert "places_lt (train, val, test): 3 images, 1 decoded, 1 missing, 1 corrupt" in out
    assert "val entry 1: " in out and "val.jpg: corrupt" in out and "test.jpg: missing" in out
    assert "1 missing and 1 corrupt of 3 images" in err


@pytest.mark.parametrize("spec", [NIH_CXR_LT, MIMIC_CXR_LT], ids=lambda spec: spec.name)
def test_check_data_covers_every_cxr_split(tmp_path: Path, spec) -> None:
    for split in CXR_SPLITS:
        write_cxr_csv(tmp_path, spec, split)
    dataset = load_dataset(DataConfig(name=spec.name, root=str(tmp_path)))
    # A bad image named by balanced-test alone: the last row of the other splits is dropped.
    for split in ("train", "balanced-val", "test"):
        path = spec.csv_path(tmp_path, split)
        path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    only_in_balanced_test = tmp_path / dataset.test.paths[-1]
    only_in_balanced_test.write_bytes(b"broken")
    report = check_data(load_dataset(DataConfig(name=spec.name, root=str(tmp_path))))
    n = len(spec.class_names)
    assert report.splits == ["train", "val", "test", "balanced-test"] and report.checked == 4 * n - 3
    assert [(b.split, b.entry, b.path) for b in report.bad] == [("balanced-test", n, str(only_in_balanced_test))]


def test_list_files_take_places_style_paths_relative_and_other_absolute_paths_as_they_are(tmp_path):
    from jrcl_fast.data.filelist import read_file_list

    listed = tmp_path / "list.txt"
    listed.write_text("/a/abbey/0001.jpg 0\n/data/elsewhere/x.jpg 1\nb/bar/2.jpg 2\n")
    split = read_file_list(listed, tmp_path)
    assert split.paths == ["a/abbey/0001.jpg", "/data/elsewhere/x.jpg", "b/bar/2.jpg"]
