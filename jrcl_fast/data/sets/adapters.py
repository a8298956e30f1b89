"""Adapters from the published label files of NIH-CXR-LT, MIMIC-CXR-LT, iNaturalist
2018 and Places-LT to LongTailedDataset.

Each reader checks the format as it goes: a wrong file is a UserError naming the
file, the line (or JSON entry) and what was expected, never a KeyError at step 1000.
The registrations at the end make them data sets a config can name.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from jrcl_fast.data.catalog import DatasetEntry
from jrcl_fast.data.filelist import read_file_list
from jrcl_fast.data.long_tailed_dataset import LongTailedDataset, Split, require_files
from jrcl_fast.data.metadata_cache import load_cached
from jrcl_fast.errors import UserError
from jrcl_fast.registry import DATASETS


@dataclass(frozen=True)
class CxrSpec:
    """How one CXR-LT data set lays out its split CSVs (CXR-LT benchmark, Holste et al. 2022)."""

    name: str
    file_prefix: str  # <prefix>_single-label_<split>.csv
    # Benchmark class order (by training frequency, No Finding first); CSV columns are mapped by name.
    class_names: tuple[str, ...]
    id_columns: tuple[str, ...]  # required non-class columns
    path_column: str  # the image path, relative to image_folder
    image_folder: str  # relative to the data root
    # Published head/medium/tail sizes along the class order; None: derive from training counts.
    shot_sizes: tuple[int, int, int] | None

    def csv_name(self, split: str) -> str:
        return f"{self.file_prefix}_single-label_{split}.csv"

    def csv_path(self, root: Path, split: str) -> Path:
        return root / self.csv_name(split)


CXR_SPLITS = ("train", "balanced-val", "test", "balanced-test")  # the published split CSVs


NIH_CXR_LT = CxrSpec(
    name="nih_cxr_lt",
    file_prefix="nih-cxr-lt",
    class_names=(
        "No Finding", "Infiltration", "Atelectasis", "Effusion", "Nodule", "Mass", "Pneumothorax",
        "Consolidation", "Pleural_Thickening", "Cardiomegaly", "Fibrosis", "Edema", "Tortuous Aorta",
        "Emphysema", "Pneumonia", "Calcification of the Aorta", "Pneumoperitoneum", "Hernia",
        "Subcutaneous Emphysema", "Pneumomediastinum",
    ),
    id_columns=("id", "subject_id"),
    path_column="id",
    image_folder="images",
    shot_sizes=(7, 10, 3),
)

MIMIC_CXR_LT = CxrSpec(
    name="mimic_cxr_lt",
    file_prefix="mimic-cxr-lt",
    class_names=(
        "No Finding", "Lung Opacity", "Cardiomegaly", "Atelectasis", "Pleural Effusion", "Support Devices",
        "Edema", "Pneumonia", "Pneumothorax", "Lung Lesion", "Fracture", "Enlarged Cardiomediastinum",
        "Consolidation", "Pleural Other", "Calcification of the Aorta", "Tortuous Aorta", "Pneumoperitoneum",
        "Subcutaneous Emphysema", "Pneumomediastinum",
    ),
    id_columns=("subject_id", "study_id", "dicom_id", "path"),
    path_column="path",
    image_folder="",  # `path` is already relative to the MIMIC-CXR-JPG root (files/p10/...)
    shot_sizes=None,  # the benchmark's MIMIC group sizes are not in the published files
)

CXR_SPECS = {spec.name: spec for spec in (NIH_CXR_LT, MIMIC_CXR_LT)}
CXR_NORMAL_CLASS = "No Finding"  # BDC's normal group G


def read_cxr_csv(csv_path: Path, spec: CxrSpec, image_root: Path) -> Split:
    """One single-label split CSV: the one-hot class columns, found by name, give the label."""
    if not csv_path.is_file():
        raise UserError(f"{csv_path} does not exist; data.root must hold the {spec.name} split CSVs")
    with csv_path.open(newline="") as handle:
        rows = csv.reader(handle)
        header = next(rows, None)
        expected = (*spec.id_columns, *spec.class_names)
        if header is None:
            raise UserError(f"{csv_path}: the file is empty; expected a header with columns {', '.join(expected)}")
        missing = [c for c in expected if c not in header]
        if missing:
            raise UserError(f"{csv_path} line 1: column {missing[0]!r} is missing; "
                            f"a {spec.name} split needs columns {', '.join(expected)}")
        class_cols = [header.index(c) for c in spec.class_names]
        path_col = header.index(spec.path_column)
        paths, labels = [], []
        for line, row in enumerate(rows, start=2):
            if len(row) != len(header):
                raise UserError(f"{csv_path} line {line}: {len(row)} fields, expected {len(header)} as in the header")
            one_hot = [row[i].strip() for i in class_cols]
            bad = next((k for k, v in enumerate(one_hot) if v not in ("0", "1")), None)
            if bad is not None:
                raise UserError(f"{csv_path} line {line}: column {spec.class_names[bad]!r} is {one_hot[bad]!r}; "
                                "expected 0 or 1")
            hot = [k for k, v in enumerate(one_hot) if v == "1"]
            if len(hot) != 1:
                found = ", ".join(spec.class_names[k] for k in hot) or "none"
                raise UserError(f"{csv_path} line {line}: a single-label row needs exactly one 1 among the "
                                f"{len(spec.class_names)} class columns, found {len(hot)} ({found})")
            paths.append(str(Path(spec.image_folder) / row[path_col]))
            labels.append(hot[0])
    return Split(image_root, paths, np.asarray(labels, dtype=np.int64), str(csv_path))


def read_cxr_split(root: Path, spec: CxrSpec, split: str) -> Split:
    """`split` is one of train, balanced-val, test, balanced-test (the published file names)."""
    return read_cxr_csv(spec.csv_path(root, split), spec, root)


def load_cxr_lt(root: Path, spec: CxrSpec) -> LongTailedDataset:
    """Train on train, test on the imbalanced test split (the benchmark's balanced
    accuracy). balanced-val is the validation split (train.select_on and
    train.early_stop_patience use it, as the benchmark does); balanced-test is a further
    test split, reported under `other_splits` (the benchmark's head/medium/tail accuracy)."""
    require_files(root, [spec.csv_name(split) for split in CXR_SPLITS], f"the four {spec.name} split CSVs")
    groups = None
    if spec.shot_sizes is not None:
        many, medium, _ = spec.shot_sizes
        order = list(range(len(spec.class_names)))
        groups = {"many": order[:many], "medium": order[many:many + medium], "few": order[many + medium:]}
    return LongTailedDataset(
        name=spec.name,
        class_names=list(spec.class_names),
        train=read_cxr_split(root, spec, "train"),
        val=read_cxr_split(root, spec, "balanced-val"),
        test=read_cxr_split(root, spec, "test"),
        shot_groups=groups,
        extra_splits={"balanced-test": read_cxr_split(root, spec, "balanced-test")},
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path} does not exist; data.root must hold the iNaturalist 2018 JSON files")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from None
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data, dict) or key not in data]
    if missing:
        raise UserError(f"{path}: key {missing[0]!r} is missing; expected a COCO-style object with "
                        "images, annotations and categories")
    return data


def _entry(path: Path, kind: str, i: int, entry: object, keys: tuple[str, ...]) -> dict:
    if not isinstance(entry, dict) or any(k not in entry for k in keys):
        raise UserError(f"{path}: {kind} entry {i + 1} is {entry!r:.80}; expected an object with {', '.join(keys)}")
    return entry


def coco_split(path: Path, data: dict, root: Path, class_of: dict[int, int]) -> Split:
    """Images of one parsed COCO-style file, labelled class_of[category_id]."""
    label_of_image: dict[int, int] = {}
    for i, ann in enumerate(data["annotations"]):
        ann = _entry(path, "annotations", i, ann, ("image_id", "category_id"))
        if ann["category_id"] not in class_of:
            raise UserError(f"{path}: annotations entry {i + 1} has category_id {ann['category_id']!r}, "
                            "which is not among the categories of train2018.json")
        if ann["image_id"] in label_of_image:
            raise UserError(f"{path}: annotations entry {i + 1} labels image {ann['image_id']} a second time; "
                            "expected one label per image")
        label_of_image[ann["image_id"]] = class_of[ann["category_id"]]
    paths, labels = [], []
    for i, image in enumerate(data["images"]):
        image = _entry(path, "images", i, image, ("id", "file_name"))
        if image["id"] not in label_of_image:
            raise UserError(f"{path}: images entry {i + 1} (id {image['id']}) has no annotation; "
                            "expected exactly one per image")
        paths.append(image["file_name"])
        labels.append(label_of_image[image["id"]])
    return Split(root, paths, np.asarray(labels, dtype=np.int64), str(path))


def load_inat2018(root: Path) -> LongTailedDataset:
    """train2018.json and val2018.json; the published val split is the benchmark's test set."""
    require_files(root, ["train2018.json", "val2018.json"], "the iNaturalist 2018 JSON files")
    train_json, val_json = root / "train2018.json", root / "val2018.json"
    train = _read_json(train_json)
    categories = sorted((_entry(train_json, "categories", i, c, ("id", "name"))
                         for i, c in enumerate(train["categories"])), key=lambda c: c["id"])
    class_of = {c["id"]: k for k, c in enumerate(categories)}
    return LongTailedDataset(
        name="inat2018",
        class_names=[str(c["name"]) for c in categories],
        class_ids=[c["id"] for c in categories],
        train=coco_split(train_json, train, root, class_of),
        test=coco_split(val_json, _read_json(val_json), root, class_of),
    )


PLACES_LT_CLASSES = 365
PLACES_LT_FILES = [f"Places_LT_{split}.txt" for split in ("train", "val", "test")]


def places_class_names(train: Split) -> list[str]:
    """Scene names from the training paths, as Places365 names its categories
    (`.../a/abbey/x.jpg` -> abbey, `.../a/arena/hockey/x.jpg` -> arena/hockey: the
    folders below the one-letter folder). A class whose paths give no name, or
    disagree, keeps its label number."""
    names: dict[int, set[str]] = {}
    for rel, label in zip(train.paths, train.labels.tolist()):
        folders = PurePosixPath(rel).parts[:-1]
        letter = next((k for k, part in enumerate(folders) if len(part) == 1 and part.isalpha()), None)
        name = "/".join(folders[letter + 1:]) if letter is not None else ""
        names.setdefault(label, set()).add(name)
    unique = {label: found.pop() for label, found in names.items() if len(found) == 1 and "" not in found}
    return [unique.get(c, str(c)) for c in range(PLACES_LT_CLASSES)]


def load_places_lt(root: Path) -> LongTailedDataset:
    require_files(root, PLACES_LT_FILES, "the Places-LT list files")
    train = read_file_list(root / PLACES_LT_FILES[0], root)
    return LongTailedDataset(
        name="places_lt",
        class_names=places_class_names(train),
        train=train,
        val=read_file_list(root / PLACES_LT_FILES[1], root),
        test=read_file_list(root / PLACES_LT_FILES[2], root),
    )


def cached(name: str, files: list[str], load: Callable[[Path], LongTailedDataset]) -> Callable:
    """A DatasetEntry's load: `load(root)` parsed once per node (data/metadata_cache.py),
    keyed on the label files `files` under data.root."""
    return lambda root, cfg: load_cached(name, root, [root / f for f in files], lambda: load(root))


CXR_FILES = {name: [spec.csv_name(split) for split in CXR_SPLITS] for name, spec in CXR_SPECS.items()}

DATASETS.register("nih_cxr_lt", DatasetEntry(cached("nih_cxr_lt", CXR_FILES["nih_cxr_lt"],
                                                    lambda root: load_cxr_lt(root, NIH_CXR_LT)),
                                             "xray", normal_classes=(CXR_NORMAL_CLASS,)))
DATASETS.register("mimic_cxr_lt", DatasetEntry(cached("mimic_cxr_lt", CXR_FILES["mimic_cxr_lt"],
                                                      lambda root: load_cxr_lt(root, MIMIC_CXR_LT)),
                                               "xray", normal_classes=(CXR_NORMAL_CLASS,)))
DATASETS.register("inat2018", DatasetEntry(cached("inat2018", ["train2018.json", "val2018.json"], load_inat2018),
                                           "natural"))
DATASETS.register("places_lt", DatasetEntry(cached("places_lt", PLACES_LT_FILES, load_places_lt), "natural"))
