"""User mistakes end with one clear line on stderr, exit code 2 and no traceback."""

import dataclasses
import os
import shutil

import pytest
import torch
from helpers import run_cli, tiny_config
from rich.console import Console

from jrcl_fast.config import load_config
from jrcl_fast.data.catalog import load_dataset
from jrcl_fast.data.long_tailed_dataset import Split
from jrcl_fast.data.sets.digits_lt import prepare_digits_lt
from jrcl_fast.engine.trainer import train
from jrcl_fast.errors import UserError


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
    assert_user_error(run_train(tmp_path, root), f"{folder / 'train.txt'}: entry 1 ({missing}) is missing; "
                      "fix the path or data.root, and run 'jrcl-fast check-data'")


def test_missing_test_images_stop_the_run_before_training(tmp_path, broken_root):
    root, folder = broken_root
    entries = (folder / "test.txt").read_text().split()[::2]
    for rel in (entries[2], entries[5]):
        (folder / rel).unlink()
    assert_user_error(run_train(tmp_path, root), f"{folder / 'test.txt'}: entry 3 ({folder / entries[2]}) is "
                      "missing (1 more entry is missing too)")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not a single step was trained


def test_every_split_a_run_can_read_is_checked_before_training(tmp_path, digits_root):
    """A further evaluation split (CXR-LT's balanced-test) counts too."""
    cfg = load_config(tiny_config(tmp_path, digits_root))
    dataset = load_dataset(cfg.data)
    gone = Split(dataset.test.root, dataset.test.paths[:2] + ["nowhere.png"], dataset.test.labels[:3], "bt.csv")
    dataset = dataclasses.replace(dataset, extra_splits={"balanced-test": gone})
    with pytest.raises(UserError, match=r"^bt.csv: entry 3 \(.*nowhere.png\) is missing; fix"):
        train(cfg, dataset, resume=False, overwrite=False, console=Console(quiet=True))
    assert not (tmp_path / "run").exists()


def test_corrupt_image(tmp_path, broken_root):
    root, folder = broken_root
    image = first_train_image(folder)
    image.write_bytes(image.read_bytes()[:20])  # truncated PNG
    assert_user_error(run_train(tmp_path, root), f"{folder / 'train.txt'}: entry 1 ({image}) is corrupt (",
                      "replace the file or remove its entry, and run 'jrcl-fast check-data'")


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
    assert_user_error(run_cli("eval", "--checkpoint", str(tmp_path / "none.pt")),
                      f"--checkpoint {tmp_path / 'none.pt'} does not exist; point it at a run's checkpoints/ folder")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # a run folder, the likeliest slip
    (tmp_path / "run" / "checkpoints" / "latest").write_text("epoch_0001")
    assert_user_error(run_cli("eval", "--checkpoint", str(tmp_path / "run")),
                      f"--checkpoint {tmp_path / 'run'} holds no checkpoint; point it at "
                      f"{tmp_path / 'run' / 'checkpoints'}, that run's checkpoints")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert_user_error(run_cli("eval", "--checkpoint", str(junk)), f"--checkpoint {junk} cannot be read",
                      "is not a jrcl-fast checkpoint")
    weights_only = tmp_path / "state_dict.pt"  # a bare state dict, the likeliest foreign .pt
    torch.save({"conv.weight": torch.zeros(1)}, weights_only)
    assert_user_error(run_cli("eval", "--checkpoint", str(weights_only)),
                      f"--checkpoint {weights_only} is not a jrcl-fast checkpoint (no 'module' and 'config' entries)")



def test_resume_of_a_checkpoint_whose_weights_are_gone(tmp_path, digits_root):
    from jrcl_fast.engine.run_setup import check_resume

    ckpt_dir = tmp_path / "run" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "latest").write_text("epoch_0002")  # its folder deleted by hand
    with pytest.raises(UserError, match=rf"^--resume {ckpt_dir}: its latest epoch's weights, {ckpt_dir}/epoch_0002/"
                                        r"\S+, are missing; start the run over with --overwrite$"):
        check_resume(load_config(tiny_config(tmp_path, digits_root)), ckpt_dir)

def test_diverging_run_stops_with_a_clear_message(tmp_path, digits_root):
    config = tiny_config(tmp_path, digits_root, optim={"lr": 1e12, "warmup_epochs": 0}, train={"epochs": 2})
    assert_user_error(run_cli("train", "--config", str(config)), "training diverged in epoch", "lower optim.lr")


def test_markup_like_text_in_an_error_is_printed_verbatim(tmp_path, digits_root):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {name: digits_lt, root: x}\n'[/bold]': 1\n")
    assert_user_error(run_cli("train", "--config", str(bad)), "unknown key '[/bold]'")


def test_triton_backend_without_a_gpu_is_refused_in_one_line(tmp_path, digits_root):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the same answer on a machine with a GPU
    done = run_cli("train", "--config", str(tiny_config(tmp_path, digits_root)), "--set", "loss.backend=triton",
                   env=env)
    assert_user_error(done, "loss.backend=triton needs a CUDA GPU", "--set loss.backend=torch", "TRITON_INTERPRET=1")
    assert not (tmp_path / "run").exists()


def test_triton_backend_under_the_interpreter_is_allowed(tmp_path, digits_root, monkeypatch):
    from jrcl_fast.cli import _check_loss_backend

    cfg = load_config(tiny_config(tmp_path, digits_root), ["loss.backend=triton"])
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    for value, refused in (("1", False), ("true", False), ("0", True), ("", True)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        if refused:
            with pytest.raises(UserError, match="needs a CUDA GPU"):
                _check_loss_backend(cfg)
        else:
            _check_loss_backend(cfg)


def finished_run(tmp_path, digits_root, epochs_done=1, epochs=1):
    """A config whose output folder holds a run that finished `epochs_done` epochs."""
    config = tiny_config(tmp_path, digits_root, train={"epochs": epochs})
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / f"epoch_{epochs_done:04d}").mkdir(parents=True)
    (checkpoints / "latest").write_text(f"epoch_{epochs_done:04d}")
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n" * epochs_done)
    return config, checkpoints


def test_resuming_a_finished_run_says_how_to_evaluate_it(tmp_path, digits_root):
    config, checkpoints = finished_run(tmp_path, digits_root)
    assert_user_error(run_cli("train", "--config", str(config), "--resume"),
                      f"--resume: the run in {tmp_path / 'run'} is complete (all 1 epochs trained)",
                      f"'jrcl-fast eval --checkpoint {checkpoints}'")
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == "{}\n"  # untouched


def test_resume_with_overwrite_is_refused(tmp_path, digits_root):
    config, checkpoints = finished_run(tmp_path, digits_root, epochs_done=1, epochs=2)
    assert_user_error(run_cli("train", "--config", str(config), "--resume", "--overwrite"),
                      "--resume and --overwrite contradict each other", "pass one of them")
    assert (checkpoints / "latest").read_text() == "epoch_0001"  # nothing deleted


def hand_made_checkpoint(tmp_path, digits_root, **model):
    """A run's checkpoints/ folder holding one epoch of an untrained model of the tiny
    config with `model` overrides, and no network revision (as before revision 2)."""
    import yaml

    from jrcl_fast.checkpoint import MODEL_STATES, save_model_states
    from jrcl_fast.config import config_to_dict, parse_config
    from jrcl_fast.models import JRCLNet

    cfg = parse_config(yaml.safe_load(tiny_config(tmp_path, digits_root, model=model).read_text()), "tiny")
    tag = tmp_path / "old" / "checkpoints" / "epoch_0001"
    save_model_states(tag / MODEL_STATES, {"module": JRCLNet.to_load(cfg.model, 10).state_dict(),
                                           "config": config_to_dict(cfg), "epochs_done": 1})
    (tag.parent / "latest").write_text("epoch_0001")
    return tag.parent


def test_eval_refuses_a_group_norm_checkpoint_of_the_older_network(tmp_path, digits_root):
    """Revision 1 group-norm weights have the same names as today's but mean another network:
    without the check they would load and evaluate to a silently wrong result."""
    done = run_cli("eval", "--checkpoint", str(hand_made_checkpoint(tmp_path, digits_root, norm="group")))
    assert_user_error(done, "was trained with network revision 1", "model.norm=group", "train it again")


def test_eval_of_a_pretrained_run_needs_no_imagenet_file(tmp_path, digits_root):
    """The checkpoint holds every weight: eval (and every fp32 copy in training) must not
    read, or require, the ImageNet file that model.pretrained started from."""
    ckpt = hand_made_checkpoint(tmp_path, digits_root, pretrained=True)
    done = run_cli("eval", "--checkpoint", str(ckpt), env={**os.environ, "TORCH_HOME": str(tmp_path / "empty")})
    assert done.returncode == 0, done.stderr
