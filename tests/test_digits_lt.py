import numpy as np
from helpers import tree_digest
from PIL import Image
from sklearn.datasets import load_digits

from jrcl_fast.data.embedded import long_tail_counts
from jrcl_fast.data.filelist import read_file_list
from jrcl_fast.data.sets.digits_lt import load_digits_lt, prepare_digits_lt


def test_written_once_and_deterministic(tmp_path):
    a = prepare_digits_lt(tmp_path / "a", 50, 0.3, seed=3)
    b = prepare_digits_lt(tmp_path / "b", 50, 0.3, seed=3)
    assert tree_digest(a) == tree_digest(b)
    mtime = (a / "train.txt").stat().st_mtime_ns
    assert prepare_digits_lt(tmp_path / "a", 50, 0.3, seed=3) == a
    assert (a / "train.txt").stat().st_mtime_ns == mtime
    assert tree_digest(prepare_digits_lt(tmp_path / "c", 50, 0.3, seed=4)) != tree_digest(a)


def test_default_profile_counts(tmp_path):
    # n_c = floor(122 * 50^(-c/9)), worked out by hand for the default split.
    assert load_digits_lt(tmp_path, 50.0, 0.3, seed=0).train_counts.tolist() == [122, 78, 51, 33, 21, 13, 8, 5, 3, 2]


def test_long_tail_profile_and_stratified_test(tmp_path):
    ratio = 20.0
    data = load_digits_lt(tmp_path, ratio, 0.25, seed=0)
    counts = data.train_counts
    assert np.all(np.diff(counts) <= 0) and counts[0] > counts[-1] >= 1
    assert counts.tolist() == long_tail_counts(int(counts[0]), 10, ratio)
    assert abs(counts[0] / counts[-1] - ratio) / ratio < 0.35  # integer rounding of a small tail
    per_class = np.bincount(load_digits().target, minlength=10)
    test_counts = np.bincount(data.test.labels, minlength=10)
    assert np.all(np.abs(test_counts - 0.25 * per_class) <= 1)


def test_images_are_the_real_digits_through_the_list_reader(tmp_path):
    folder = prepare_digits_lt(tmp_path, 50, 0.3, seed=0)
    split = read_file_list(folder / "test.txt", folder)
    digits = load_digits()
    originals = {np.rint(img * 255 / 16).astype(np.uint8).tobytes(): y for img, y in zip(digits.images, digits.target)}
    train = read_file_list(folder / "train.txt", folder)
    seen = set()
    for s in (split, train):
        for rel, label in zip(s.paths, s.labels):
            pixels = np.asarray(Image.open(folder / rel))
            assert pixels.shape == (8, 8)
            assert originals[pixels.tobytes()] == label
            seen.add(rel.rsplit("/", 1)[1])  # the file name is the index into load_digits
    assert len(seen) == len(split) + len(train)  # no image in both splits
