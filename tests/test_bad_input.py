"""User mistakes end with one clear line on stderr, exit code 2 and no traceback."""

import shutil

import pytest

from helpers import run_cli, tiny_config

from jrcl_fast.data.digits_lt import prepare_digits_lt


@pytest.fixture
def broken_root(tmp_path, digits_root):
    """A private copy of digits-lt that a test may damage."""
    folder = prepare_digits_lt(digits_root)
    root = tmp_path / "data"
    shutil.copytree(folder, root / folder.name)
    return root, root / folder.name


def first_train_image(folder):
    return folder / (folder / "train.txt").read_text().split()[0]


def run_train(tmp_path, root, batch_size=32):
    config = tiny_config(tmp_path, root, train={"epochs": 1, "batch_size": batch_size})
    return run_cli("train", "--config", str(config))


def assert_user_error(done, *fragments):
    assert done.returncode == 2, done.stderr + done.stdout
    assert "Traceback" not in done.stderr
    message = " ".join(done.stderr.split())  # rich may wrap long lines
    assert message.startswith("error:")
    for fragment in fragments:
        assert fragment in message


def test_missing_image_file(tmp_path, broken_root):
    root, folder = broken_root
    missing = first_train_image(folder)
    missing.unlink()
    assert_user_error(run_train(tmp_path, root), f"{folder / 'train.txt'}: entry 1 names", "does not exist")


def test_corrupt_image(tmp_path, broken_root):
    root, folder = broken_root
    image = first_train_image(folder)
    image.write_bytes(image.read_bytes()[:20])  # truncated PNG
    assert_user_error(run_train(tmp_path, root), f"image {image} is unreadable or corrupt", "check-data")


def test_label_out_of_range(tmp_path, broken_root):
    root, folder = broken_root
    lines = (folder / "train.txt").read_text().splitlines()
    lines[4] = lines[4].rsplit(" ", 1)[0] + " 12"
    (folder / "train.txt").write_text("\n".join(lines) + "\n")
    assert_user_error(run_train(tmp_path, root), f"{folder / 'train.txt'}: entry 5 has label 12, outside [0, 10)")


def test_malformed_list_line(tmp_path, broken_root):
    root, folder = broken_root
    (folder / "test.txt").write_text("train/0/0001.png zero\n")
    assert_user_error(run_train(tmp_path, root), f"{folder / 'test.txt'} line 1: expected 'relative/path label'")


def test_empty_split(tmp_path, broken_root):
    root, folder = broken_root
    (folder / "test.txt").write_text("")
    assert_user_error(run_train(tmp_path, root), f"{folder / 'test.txt'}: the split is empty")


def test_bad_config(tmp_path, digits_root):
    assert_user_error(run_cli("train", "--config", str(tiny_config(tmp_path, digits_root)), "--set", "optim.lr=-1"),
                      "key 'optim.lr' must be positive")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {name: digits_lt, root: x}\noptimizer: {lr: 1}\n")
    assert_user_error(run_cli("train", "--config", str(bad)), f"{bad}: unknown key 'optimizer'")


def test_batch_larger_than_train_split(tmp_path, digits_root):
    assert_user_error(run_train(tmp_path, digits_root, batch_size=5000), "train.batch_size 5000",
                      "lower train.batch_size")


def test_eval_of_missing_or_foreign_checkpoint(tmp_path):
    assert_user_error(run_cli("eval", "--checkpoint", str(tmp_path / "none.pt")), "does not exist")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert_user_error(run_cli("eval", "--checkpoint", str(junk)), "is not a jrcl-fast checkpoint")


def test_diverging_run_stops_with_a_clear_message(tmp_path, digits_root):
    config = tiny_config(tmp_path, digits_root, optim={"lr": 1e12, "warmup_epochs": 0}, train={"epochs": 2})
    assert_user_error(run_cli("train", "--config", str(config)), "training diverged in epoch", "lower optim.lr")


def test_markup_like_text_in_an_error_is_printed_verbatim(tmp_path, digits_root):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {name: digits_lt, root: x}\n'[/bold]': 1\n")
    assert_user_error(run_cli("train", "--config", str(bad)), "unknown key '[/bold]'")
