"""From a DataConfig to a LongTailedDataset and its loaders: the data layer's entry point."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from jrcl_fast.config import DataConfig
from jrcl_fast.data.adapters import CXR_SPECS, load_cxr_lt, load_inat2018
from jrcl_fast.data.dataset import LongTailedDataset, Split, require_files
from jrcl_fast.data.digits_lt import load_digits_lt
from jrcl_fast.data.filelist import read_file_list
from jrcl_fast.errors import UserError


PLACES_LT_CLASSES = 365


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
    lists = {split: f"Places_LT_{split}.txt" for split in ("train", "val", "test")}
    require_files(root, list(lists.values()), "the Places-LT list files")
    train = read_file_list(root / lists["train"], root)
    return LongTailedDataset(
        name="places_lt",
        class_names=places_class_names(train),
        train=train,
        val=read_file_list(root / lists["val"], root),
        test=read_file_list(root / lists["test"], root),
    )


def load_dataset(cfg: DataConfig) -> LongTailedDataset:
    root = Path(cfg.root).expanduser()
    if cfg.name == "digits_lt":
        return load_digits_lt(root, cfg.imbalance_ratio, cfg.test_fraction, cfg.split_seed)
    if not root.is_dir():
        raise UserError(f"data.root {root} is not a folder; point it at the {cfg.name} data set")
    if cfg.name == "places_lt":
        return load_places_lt(root)
    if cfg.name in CXR_SPECS:
        return load_cxr_lt(root, CXR_SPECS[cfg.name])
    if cfg.name == "inat2018":
        return load_inat2018(root)
    raise UserError(f"data.name {cfg.name}: this data set has no adapter yet")
