from pathlib import Path

import pytest

from jrcl_fast.config import DATASETS, Config, load_config
from jrcl_fast.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", DATASETS)
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
        ("data: {name: mnist, root: x}\n", r"key 'data\.name' must be one of"),
        ("data: {name: digits_lt, root: x}\ntrain: {batch_size: 0}\n", r"key 'train\.batch_size' must be positive"),
        ("data: {name: digits_lt, root: x, normal_classes: [1, 2]}\n", r"key 'data\.normal_classes\[0\]' must be str"),
        ("data: [1, 2]\n", r"c\.yaml: section 'data' must be a mapping"),
        ("data: {name: digits_lt, root: x\n", r"c\.yaml line \d+: not valid YAML"),
        ("data: {name: digits_lt, root: x, imbalance_ratio: 0.5}\n", r"'data\.imbalance_ratio' .* at least 1"),
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
