"""animal-lt: 10,000 real 28x28 grayscale animal silhouettes (the PyPI package
animal-shape-mnist 0.39, MIT; 1,000 per class), made long-tailed like the chest X-ray
benchmarks, with a normal class that is hard to tell from several abnormal ones.

The package repeats some images: 285 of the 10,000 lie within an L2 distance of 1.0
(pixels in [0, 1]) of an earlier image of their class, most of them exact copies (188
of the 1,000 birds), and no other pair of images comes closer than 0.5. A copy on both
sides of a split would be a test image seen in training, so each is dropped before the
split, leaving 812 to 1,000 distinct images per class.

Per class, a fixed seeded split of the distinct images: 50 for validation and 200 for
test (balanced), and from the rest the training images. The normal class, the analogue
of CXR-LT's "No Finding" and BDC's normal group, heads the exponential profile with
700 images (about all that is left of it: 735 to 747 for dog, cat, horse and sheep);
the other nine follow n_k = 700 * ratio^(-k / 9), k = 1..9 in class order (ratio 100:
419, 251, 150, 90, 54, 32, 19, 11 and 7 images; 1,733 training images in all).

The normal class is the dog, chosen by measurement (benchmarks/animal_lt_probe.py,
docs/results/animal_lt_probe.json: a 3-layer CNN, logit-adjusted CE, 15 epochs, 2 seeds,
validation split): of the candidates dog, cat, horse and sheep, its normal-vs-abnormal
balanced accuracy is the lowest, 95.6% (cat 96.6, sheep 96.7, horse 97.9), so the
normal/abnormal call is hardest there, as "No Finding" against the findings that look
like it. No candidate reached the 95% the issue aimed for.

The package is read, never imported: its folder has `_init_.py` (no `__init__.py`)
and its loader imports TensorFlow. Its two files are gzip-compressed pickles of numpy
arrays, read with an unpickler that admits only numpy's array reconstruction.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.metadata
import pickle
from pathlib import Path

import numpy as np

from jrcl_fast.config import DataConfig
from jrcl_fast.data.catalog import DatasetEntry
from jrcl_fast.data.embedded import held_out_splits, normal_head_counts, read_written, write_once, write_splits
from jrcl_fast.data.long_tailed_dataset import LongTailedDataset
from jrcl_fast.errors import UserError
from jrcl_fast.registry import DATASETS

# Label i of the package's files is CLASS_NAMES[i] (checked by eye on a grid of samples:
# docs/results/animal_lt_samples.png).
CLASS_NAMES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
NUM_CLASSES = len(CLASS_NAMES)
PER_CLASS = 1000
TRAIN_MAX, VAL, TEST = 700, 50, 200  # the normal class's training images; held out per class
# Closer than this (L2 over 0-255 pixels: 1.0 in [0, 1] units) is a copy; the next closest pair is at 0.5.
DUPLICATE_DISTANCE = 255.0
NORMAL_CLASS = "dog"

DISTRIBUTION = "animal-shape-mnist"
IMAGES_FILE, LABELS_FILE = "animal_data_version_3.gz", "animal_label_version_3.gz"
INSTALL_HINT = f"pip install {DISTRIBUTION}==0.39"


def _reconstruct():
    # The pickles name numpy.core.multiarray._reconstruct, which NumPy 2 serves from numpy._core.
    core = getattr(np, "_core", None) or np.core
    return core.multiarray._reconstruct


# The only globals the package's pickles reference (pickletools.genops over both files).
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and refuses every other global, so a tampered file cannot
    run code (pickle.load would call whatever the file names)."""

    def find_class(self, module: str, name: str):
        resolve = ALLOWED_GLOBALS.get((module, name))
        if resolve is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not a numpy array's reconstruction; refusing it")
        return resolve()


def read_array(path: Path) -> np.ndarray:
    """The numpy array a gzip-compressed pickle at `path` holds (NumpyArrayUnpickler)."""
    with gzip.open(path, "rb") as f:
        try:
            array = NumpyArrayUnpickler(f).load()
        except pickle.UnpicklingError as err:
            raise UserError(f"{path}: {err}; reinstall it with `{INSTALL_HINT}`") from None
    if not isinstance(array, np.ndarray):
        raise UserError(f"{path} holds a {type(array).__name__}, not a numpy array; reinstall it with `{INSTALL_HINT}`")
    return array


def package_file(name: str) -> Path:
    """The installed package's data file `name`, checked against the wheel's RECORD hash."""
    try:
        files = importlib.metadata.distribution(DISTRIBUTION).files or []
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"data.name animal_lt needs the {DISTRIBUTION} package; "
                        f"install it with `{INSTALL_HINT}`") from None
    entry = next((f for f in files if f.name == name), None)
    path = Path(entry.locate()) if entry is not None else None
    if path is None or not path.is_file():
        raise UserError(f"{DISTRIBUTION} is installed without its file {name}; reinstall it with `{INSTALL_HINT}`")
    if entry.hash is not None:
        digest = base64.urlsafe_b64encode(hashlib.new(entry.hash.mode, path.read_bytes()).digest()).rstrip(b"=")
        if digest.decode() != entry.hash.value:
            raise UserError(f"{path} differs from the file {DISTRIBUTION} installed; "
                            f"reinstall it with `{INSTALL_HINT}`")
    return path


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 10,000 images (N x 28 x 28 uint8) and their labels (0-9, CLASS_NAMES order)."""
    images_path, labels_path = package_file(IMAGES_FILE), package_file(LABELS_FILE)
    images, labels = read_array(images_path), read_array(labels_path)
    n = NUM_CLASSES * PER_CLASS
    if images.shape != (n, 28, 28) or images.dtype != np.uint8:
        raise UserError(f"{images_path} holds {images.dtype} images of shape {images.shape}, not uint8 "
                        f"({n}, 28, 28); reinstall it with `{INSTALL_HINT}`")
    if labels.shape != (n,) or labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise UserError(f"{labels_path} holds {labels.dtype} labels of shape {labels.shape}, not integers "
                        f"0-{NUM_CLASSES - 1} for {n} images; reinstall it with `{INSTALL_HINT}`")
    return images, labels.astype(np.int64)


def distinct(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mask of the images kept: each one unless an earlier kept image of its class lies
    within DUPLICATE_DISTANCE. Integer pixels in float64: the distances are exact."""
    keep = np.zeros(len(labels), dtype=bool)
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        flat = images[idx].reshape(len(idx), -1).astype(np.float64)
        square = (flat ** 2).sum(1)
        near = square[:, None] + square[None, :] - 2 * flat @ flat.T < DUPLICATE_DISTANCE ** 2
        kept = np.ones(len(idx), dtype=bool)
        for i in range(len(idx)):
            if kept[i]:
                kept[i + 1:] &= ~near[i, i + 1:]
        keep[idx[kept]] = True
    return keep


def train_counts(imbalance_ratio: float, normal: int = CLASS_NAMES.index(NORMAL_CLASS)) -> list[int]:
    """Training images per class: the normal class first on the profile, then the others in order."""
    return normal_head_counts(TRAIN_MAX, NUM_CLASSES, imbalance_ratio, normal)


def splits(images: np.ndarray, labels: np.ndarray, imbalance_ratio: float, seed: int,
           normal: int = CLASS_NAMES.index(NORMAL_CLASS)) -> dict[str, list[tuple[int, int]]]:
    """(image index, label) pairs of train, val and test, copies dropped; `normal` heads the tail."""
    labels = np.where(distinct(images, labels), labels, -1)
    return held_out_splits(labels, train_counts(imbalance_ratio, normal), VAL, TEST, seed)


def prepare_animal_lt(cache_root: str | Path, imbalance_ratio: float = 100.0, seed: int = 0) -> Path:
    """Write animal-lt under `cache_root` once and return its folder."""
    folder = Path(cache_root) / f"animal_lt_{NORMAL_CLASS}_ir{imbalance_ratio:g}_seed{seed}"

    def write(staging: Path) -> None:
        images, labels = load_arrays()
        write_splits(staging, images, splits(images, labels, imbalance_ratio, seed))

    return write_once(folder, write)


def _load(root: Path, cfg: DataConfig) -> LongTailedDataset:
    folder = prepare_animal_lt(root, cfg.imbalance_ratio, cfg.split_seed)
    return read_written("animal_lt", folder, list(CLASS_NAMES))


DATASETS.register("animal_lt", DatasetEntry(_load, "silhouettes", normal_classes=(NORMAL_CLASS,), embedded=True))
