from pathlib import Path

import pytest

from jrcl_fast.config import Config, load_config
from jrcl_fast.errors import UserError
from jrcl_fast.registry import DATASETS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_shipped_config_validates(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert isinstance(cfg, Config) and cfg.data.name == name


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_overrides_are_typed_and_applied(tmp_path):
    cfg = load_config(CONFIGS / "digits_lt.yaml",
                      ["optim.lr=0.25", "train.epochs=7", "loss.divergence=sym_kl", "data.normal_classes=['0', '1']"])
    assert cfg.optim.lr == 0.25 and cfg.train.epochs == 7 and cfg.loss.divergence == "sym_kl"
    assert cfg.data.normal_classes == ["0", "1"]


@pytest.mark.parametrize(
    "text,message",
    [
        ("data: {name: digits_lt, root: x}\noptim: {lrr: 0.1}\n", r"c\.yaml: unknown key 'optim\.lrr'"),
        ("data: {name: digits_lt, root: x, colour: 1}\n", r"unknown key 'data\.colour'"),
        ("data: {name: digits_lt, root: x}\noptim: {lr: fast}\n", r"key 'optim\.lr' must be float, got 'fast'"),
        ("data: {name: digits_lt, root: x}\ntrain: {epochs: 2.5}\n", r"key 'train\.epochs' must be int"),
        ("data: {name: digits_lt}\n", r"missing required key 'data\.root'"),
        ("model: {backbone: resnet18}\n", r"missing required key 'data'"),
        ("data: {name: mnist, root: x}\n", r"c\.yaml: key 'data\.name' must be one of .*digits_lt.*, got 'mnist'$"),
        ("data: {name: digits_lt, root: x}\nmodel: {backbone: resnet33}\n", r"key 'model\.backbone' must be one of .*resnet32.*, got 'resnet33'$"),
        ("data: {name: digits_lt, root: x}\noptim: {name: adam}\n", r"key 'optim\.name' must be one of sgd, adamw, got 'adam'$"),
        ("data: {name: digits_lt, root: x}\nloss: {divergence: kl}\n", r"key 'loss\.divergence' must be one of js, sym_kl, got 'kl'$"),
        ("data: {name: digits_lt, root: x}\ntrain: {batch_size: 0}\n", r"key 'train\.batch_size' must be positive"),
        ("data: {name: digits_lt, root: x, normal_classes: [1, 2]}\n", r"key 'data\.normal_classes\[0\]' must be str"),
        ("data: [1, 2]\n", r"c\.yaml: section 'data' must be a mapping"),
        ("data: {name: digits_lt, root: x\n", r"c\.yaml line \d+: not valid YAML"),
        ("data: {name: digits_lt, root: x, imbalance_ratio: 0.5}\n", r"'data\.imbalance_ratio' .* at least 1"),
        ("data: {name: digits_lt, root: x, split_seed: -1}\n", r"c\.yaml: key 'data\.split_seed' must be 0 or more$"),
        ("data: {name: digits_lt, root: x}\noptim: {lr: 0.1, min_lr: 0.2}\n", r"'optim\.min_lr' must not exceed"),
        ("data: {name: digits_lt, root: x, few_shot_max: -1}\n", r"'data\.few_shot_max' must not be negative"),
    ],
)
def test_bad_config_names_key_and_file(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        load_config(write(tmp_path, text))


def test_bad_override_names_the_assignment():
    with pytest.raises(UserError, match=r"--set 'optim\.lr': expected the form section\.key=value"):
        load_config(CONFIGS / "digits_lt.yaml", ["optim.lr"])
    with pytest.raises(UserError, match=r"with --set overrides: unknown key 'optim\.learning_rate'"):
        load_config(CONFIGS / "digits_lt.yaml", ["optim.learning_rate=1"])


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


# ---------------------------------------------------------------- paths


def test_paths_in_a_config_are_relative_to_the_file_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(CONFIGS / "digits_lt.yaml")
    repo = CONFIGS.parent
    assert cfg.data.root == str(repo / ".cache" / "jrcl_fast")
    assert cfg.train.output_dir == str(repo / "runs" / "digits_lt")
    assert cfg.train.deepspeed_config == str(CONFIGS / "ds_config.json")
    assert Path(cfg.train.deepspeed_config).is_file()


def test_paths_given_with_set_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(CONFIGS / "digits_lt.yaml", ["data.root=cache", "train.output_dir=/abs/run"])
    assert cfg.data.root == str(tmp_path / "cache") and cfg.train.output_dir == "/abs/run"
    assert cfg.train.deepspeed_config == str(CONFIGS / "ds_config.json")


def test_a_missing_deepspeed_json_is_named_by_its_resolved_path(tmp_path, monkeypatch):
    import torch

    from jrcl_fast.engine.backends import deepspeed_config

    (tmp_path / "sub").mkdir()
    path = write(tmp_path / "sub", "data: {name: digits_lt, root: cache}\ntrain: {deepspeed_config: ds.json}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path)
    assert cfg.data.root == str(tmp_path / "sub" / "cache")
    with pytest.raises(UserError, match=f"train.deepspeed_config {tmp_path / 'sub' / 'ds.json'} does not exist"):
        deepspeed_config(cfg, 1, torch.device("cpu"))


def test_cli_runs_from_another_directory(tmp_path):
    """The report of the first GPU run: `--config /abs/path` from elsewhere failed."""
    import subprocess
    import sys

    folder = tmp_path / "cfg"
    folder.mkdir()
    path = write(folder, "data: {name: digits_lt, root: digits, image_size: 8}\n")
    done = subprocess.run([sys.executable, "-m", "jrcl_fast", "check-data", "--config", str(path)],
                          capture_output=True, text=True, cwd=tmp_path / "..", timeout=300)
    assert done.returncode == 0, done.stderr
    assert (folder / "digits").is_dir()
