"""The plug-in registries: every entry is usable, unknown names are one clear error,
and the config checks names against the registries without importing torch itself."""

import subprocess
import sys

import pytest
import torch

from jrcl_fast.data.augment import AUGMENTATIONS, augmentation_for
from jrcl_fast.data.catalog import DatasetEntry
from jrcl_fast.errors import UserError
from jrcl_fast.registry import BACKBONES, DATASETS, LOGGERS, OPTIMIZERS, Registry


def test_each_registry_finds_the_plug_ins_of_its_home():
    assert {"digits_lt", "nih_cxr_lt", "mimic_cxr_lt", "inat2018", "places_lt"} <= set(DATASETS)
    assert {"resnet18", "resnet50", "resnet152", "resnext50_32x4d", "resnet32"} <= set(BACKBONES)
    assert set(OPTIMIZERS) == {"sgd", "adamw"}
    assert set(LOGGERS) == {"tensorboard", "csv"}


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_data_set_names_an_augmentation_profile(name):
    entry = DATASETS.get(name)
    assert isinstance(entry, DatasetEntry) and entry.augmentation in AUGMENTATIONS
    assert augmentation_for(name) is AUGMENTATIONS[entry.augmentation]


@pytest.mark.parametrize("registry", [DATASETS, BACKBONES, OPTIMIZERS, LOGGERS], ids=lambda r: r.kind)
def test_an_unknown_name_is_one_sentence_with_the_key_and_the_known_names(registry):
    with pytest.raises(UserError) as err:
        registry.get("nope")
    message = str(err.value)
    assert message.startswith(f"{registry.key} 'nope' is not a known {registry.kind}; use one of ")
    assert all(name in message for name in registry.names()) and message.count(".") == registry.key.count(".")


@pytest.mark.parametrize("registry", [DATASETS, BACKBONES, OPTIMIZERS, LOGGERS], ids=lambda r: r.kind)
def test_the_names_read_from_source_are_the_names_registered(registry):
    fresh = Registry(registry.kind, registry.key, registry.home)  # nothing looked up yet: names from source
    assert sorted(fresh.declared()) == sorted(fresh.names()) == sorted(registry._entries or registry.names())
    registry.get(registry.names()[0])  # imports the home: every module has registered
    assert sorted(fresh.declared()) == sorted(registry.names())


def test_a_name_registered_twice_is_refused():
    registry = Registry("thing", "x.name", "jrcl_fast.errors")
    registry.register("a", 1)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("a", 2)
    assert registry.get("a") == 1 and registry.names() == ("a",)


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_optimizers_build_from_their_entries(name):
    from jrcl_fast.config import OptimConfig
    from jrcl_fast.engine.optim import build_optimizer

    optimizer = build_optimizer(OptimConfig(name=name, lr=0.01), torch.nn.Linear(3, 2))
    assert type(optimizer).__name__.lower() == name


def test_importing_the_config_imports_no_plug_in():
    code = "import sys, jrcl_fast.config; print(sorted(m for m in ('torch', 'jrcl_fast.data.sets') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
