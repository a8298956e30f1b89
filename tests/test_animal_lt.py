"""animal-lt: the installed animal-shape-mnist arrays read through a restricted unpickler,
copies dropped, one normal head class, an exponential tail of ratio 100, balanced val and
test, written once and deterministically; a tiny run trains on it."""

import gzip
import math
import os
import pickle

import numpy as np
import pytest
from helpers import REPO, one_epoch_run, tree_digest
from PIL import Image

from jrcl_fast.config import DataConfig, load_config
from jrcl_fast.data.augment import augmentation_for
from jrcl_fast.data.catalog import load_dataset
from jrcl_fast.data.sets import animal_lt
from jrcl_fast.errors import UserError
from jrcl_fast.registry import DATASETS

# The issue's statement of the package's labels (checked by eye: docs/results/animal_lt_samples.png).
ISSUE_LABELS = "bear bird cat cow dog elephant giraffe horse sheep zebra".split()


@pytest.fixture(scope="module")
def arrays():
    return animal_lt.load_arrays()


@pytest.fixture(scope="module")
def animal_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("animal_cache")
    animal_lt.prepare_animal_lt(root, 100, seed=0)
    return root


@pytest.fixture(scope="module")
def dataset(animal_root):
    return load_dataset(DataConfig(name="animal_lt", root=str(animal_root), imbalance_ratio=100))


def test_labels_are_the_issues_names_with_1000_images_each(arrays):
    images, labels = arrays
    assert list(animal_lt.CLASS_NAMES) == ISSUE_LABELS
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [1000] * 10


def test_registered_with_dog_as_normal_and_a_mirroring_gray_profile():
    entry = DATASETS.get("animal_lt")
    assert entry.normal_classes == ("dog",) and entry.embedded
    aug = augmentation_for("animal_lt")
    assert aug.grayscale and aug.flip


def test_copies_are_dropped_and_no_held_out_image_is_near_a_training_one(arrays, dataset):
    images, labels = arrays
    flat = images.reshape(len(images), -1).astype(np.float64)
    keep = animal_lt.distinct(images, labels)
    # brute force, independent of distinct(): every kept image is far from every other kept image of its class
    for c in range(10):
        kept = flat[keep & (labels == c)]
        sq = (kept ** 2).sum(1)
        d2 = sq[:, None] + sq[None, :] - 2 * kept @ kept.T
        np.fill_diagonal(d2, np.inf)
        assert d2.min() >= animal_lt.DUPLICATE_DISTANCE ** 2
    dropped = np.flatnonzero(~keep)
    assert 0 < len(dropped) < 500
    # every dropped image is a copy of a kept one of its class
    for i in dropped[:: max(1, len(dropped) // 20)]:
        same = np.flatnonzero(keep & (labels == labels[i]))
        assert np.min(((flat[same] - flat[i]) ** 2).sum(1)) < animal_lt.DUPLICATE_DISTANCE ** 2
    used = [int(p.rsplit("/", 1)[1].removesuffix(".png")) for s in (dataset.train, dataset.val, dataset.test)
            for p in s.paths]
    assert keep[used].all()


def test_counts_normal_head_ratio_100_and_balanced_val_test(dataset):
    counts = dataset.train_counts
    dog = ISSUE_LABELS.index("dog")
    tail = [c for c in range(10) if c != dog]
    assert counts[dog] == 700 and dataset.normal_classes == [dog] == [int(np.argmax(counts))]
    assert [counts[c] for c in tail] == [math.floor(700 * 100 ** (-k / 9)) for k in range(1, 10)]
    assert counts[dog] / counts[tail[-1]] == 100
    assert np.bincount(dataset.val.labels, minlength=10).tolist() == [50] * 10
    assert np.bincount(dataset.test.labels, minlength=10).tolist() == [200] * 10


def test_a_ratio_too_low_for_the_smallest_class_names_the_key(arrays):
    """At ratio 2 the second class down the tail asks for more training images than it
    has once copies are dropped and 250 are held out: a user error, not a ValueError."""
    images, labels = arrays
    with pytest.raises(UserError, match=r"^data\.imbalance_ratio is too low for this data set: class \d+ has \d+ "
                                        r"images, too few for \d+ train, 50 val and 200 test; raise it$"):
        animal_lt.splits(images, labels, 2.0, seed=0)


def test_splits_are_the_packages_images_and_disjoint(arrays, dataset):
    images, labels = arrays
    seen = []
    for split in (dataset.train, dataset.val, dataset.test):
        for rel, label in zip(split.paths, split.labels):
            index = int(rel.rsplit("/", 1)[1].removesuffix(".png"))
            assert labels[index] == label
            np.testing.assert_array_equal(np.asarray(Image.open(split.root / rel)), images[index])
            seen.append(index)
    assert len(seen) == len(set(seen)) == 1733 + 500 + 2000


def test_written_once_and_deterministic(tmp_path, animal_root):
    folder = animal_lt.prepare_animal_lt(animal_root, 100, seed=0)
    mtime = (folder / "test.txt").stat().st_mtime_ns
    assert tree_digest(animal_lt.prepare_animal_lt(tmp_path / "b", 100, seed=0)) == tree_digest(folder)
    assert (folder / "test.txt").stat().st_mtime_ns == mtime
    assert (folder / "val.txt").read_text() != (animal_lt.prepare_animal_lt(tmp_path / "c", 100, seed=1)
                                                / "val.txt").read_text()


def gz_pickle(path, payload: bytes):
    with gzip.open(path, "wb") as f:
        f.write(payload)
    return path


def test_unpickler_reads_numpy_arrays_in_the_packages_form(tmp_path):
    array = np.random.default_rng().integers(0, 256, (7, 5, 3), dtype=np.uint8)
    payload = pickle.dumps(array, protocol=3)  # protocol 3: globals as text lines, no frames to resize
    # NumPy 2 names numpy._core; the package's files (NumPy 1) name numpy.core
    payload = payload.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"numpy.core.multiarray\n_reconstruct" in payload
    np.testing.assert_array_equal(animal_lt.read_array(gz_pickle(tmp_path / "a.gz", payload)), array)


def test_unpickler_refuses_anything_but_numpy_arrays(tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    with pytest.raises(UserError, match=r"(posix|os|nt)\.system is not"):
        animal_lt.read_array(gz_pickle(tmp_path / "evil.gz", pickle.dumps(Exploit(), protocol=4)))
    assert not marker.exists()
    with pytest.raises(UserError, match="builtins.eval is not"):
        animal_lt.read_array(gz_pickle(tmp_path / "eval.gz", pickle.dumps(eval, protocol=4)))
    with pytest.raises(UserError, match="not a numpy array"):
        animal_lt.read_array(gz_pickle(tmp_path / "dict.gz", pickle.dumps({"a": 1})))


def test_wrong_shapes_or_labels_are_refused(tmp_path, monkeypatch):
    rng = np.random.default_rng()
    files = {animal_lt.IMAGES_FILE: rng.integers(0, 256, (10_000, 28, 28), dtype=np.uint8),
             animal_lt.LABELS_FILE: np.repeat(np.arange(10), 1000)}
    monkeypatch.setattr(animal_lt, "package_file", lambda name: tmp_path / name)

    def write():
        for name, array in files.items():
            gz_pickle(tmp_path / name, pickle.dumps(array, protocol=3).replace(b"numpy._core.", b"numpy.core."))

    write()
    assert animal_lt.load_arrays()[1].tolist() == files[animal_lt.LABELS_FILE].tolist()
    files[animal_lt.LABELS_FILE] = np.where(np.arange(10_000) == 3, 10, files[animal_lt.LABELS_FILE])
    write()
    with pytest.raises(UserError, match="labels"):
        animal_lt.load_arrays()
    files[animal_lt.IMAGES_FILE] = files[animal_lt.IMAGES_FILE][:, :27]
    write()
    with pytest.raises(UserError, match=r"shape \(10000, 27, 28\)"):
        animal_lt.load_arrays()


def test_shipped_config(tmp_path):
    cfg = load_config(REPO / "configs" / "animal_lt.yaml")
    assert cfg.data.name == "animal_lt" and cfg.model.backbone == "resnet32" and cfg.data.image_size == 28
    assert cfg.train.select_on == "val_balanced_accuracy"


def test_tiny_cli_run(tmp_path, animal_root):
    done, results = one_epoch_run(tmp_path, "animal_lt", animal_root)  # 13 steps of 128 at 8 px: seconds
    assert results["num_test_images"] == 2000 and results["normal_vs_abnormal_accuracy"] is not None
    assert "step 13/13" in done.stdout
