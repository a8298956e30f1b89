"""train.init_from and classifier re-training (cRT): the second stage starts from the
first run's selected weights, keeps everything but the classifier bit for bit (BatchNorm
statistics included), re-initialises the classifier and trains it alone."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import REPO, run_cli, tiny_config, train_until_killed
from rich.console import Console

from jrcl_fast.checkpoint import (
    CHECKPOINT_DIR,
    INIT_FROM_KEY,
    MODEL_STATES,
    REVISION_KEY,
    SELECTION_KEY,
    commit_latest,
    read_model_states,
)
from jrcl_fast.config import ModelConfig, config_to_dict, load_config
from jrcl_fast.data.catalog import load_dataset
from jrcl_fast.engine import trainer
from jrcl_fast.engine.init_from import describe_provenance, init_from, resumed_provenance
from jrcl_fast.engine.optim import build_optimizer
from jrcl_fast.engine.selection import Selection
from jrcl_fast.errors import UserError
from jrcl_fast.models import ARCHITECTURE_REVISION, JRCLNet

CLASSES = [str(c) for c in range(10)]
CE_ONLY = {"lambda_con": 0, "lambda_bdc": 0, "lambda_bin": 0}


def small_model_config() -> ModelConfig:
    return ModelConfig(backbone="resnet32", projection_dim=8, projection_hidden_dim=16)


def write_run(run: Path, cfg, model: JRCLNet, epochs_done: int = 1, selection: Selection | None = None) -> Path:
    """A run folder holding `model` as its checkpoint after `epochs_done` epochs, in the
    trainer's layout; with `selection`, also as its selected epoch's (an earlier one)."""
    def write(epochs: int) -> str:
        tag = f"epoch_{epochs:04d}"
        (run / CHECKPOINT_DIR / tag).mkdir(parents=True)
        torch.save({"module": model.state_dict(), "config": config_to_dict(cfg), "class_names": CLASSES,
                    "epochs_done": epochs, REVISION_KEY: ARCHITECTURE_REVISION,
                    **({SELECTION_KEY: selection.summary()} if selection else {})},
                   run / CHECKPOINT_DIR / tag / MODEL_STATES)
        return tag

    if selection and selection.best_epoch != epochs_done:
        commit_latest(run / CHECKPOINT_DIR, write(epochs_done), keep=write(selection.best_epoch))
    else:
        commit_latest(run / CHECKPOINT_DIR, write(epochs_done))
    return run / CHECKPOINT_DIR


@pytest.fixture
def first_stage(tmp_path):
    cfg = load_config(REPO / "configs" / "mnist_lt.yaml")
    cfg = dataclasses.replace(cfg, model=small_model_config())
    torch.manual_seed(1)
    model = JRCLNet(cfg.model, 10)
    with torch.no_grad():  # non-trivial statistics, as a trained run has
        model.train()
        model(torch.randn(16, 3, 28, 28) * 3 + 1)
    return cfg, model, write_run(tmp_path / "ce", cfg, model)


def second_stage(cfg, checkpoints: Path, trainable: str = "classifier"):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=str(checkpoints),
                                                              trainable=trainable))


def test_classifier_stage_freezes_all_but_a_fresh_classifier(first_stage):
    cfg, ce, checkpoints = first_stage
    crt_cfg = second_stage(cfg, checkpoints)
    torch.manual_seed(2)
    model = JRCLNet(crt_cfg.model, 10)
    init_from(model, crt_cfg, CLASSES)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}
    optimizer = build_optimizer(crt_cfg.optim, model)
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {
        id(model.classifier.weight), id(model.classifier.bias)}
    # a few steps as the trainer takes them: train() every epoch, then forward and backward
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        model.train()
        out = model(torch.randn(8, 3, 28, 28))
        torch.nn.functional.cross_entropy(out.logits, torch.randint(0, 10, (8,))).backward()
        sgd.step()
    assert not model.backbone.training and not model.projection.training and model.classifier.training
    saved, now = ce.state_dict(), model.state_dict()
    for key, value in saved.items():
        if key.startswith("classifier."):
            assert not torch.equal(now[key], value), key
        else:  # weights and BatchNorm statistics, bit for bit
            assert torch.equal(now[key], value), key


def test_the_provenance_names_the_epoch_and_an_unfinished_first_stage(first_stage, tmp_path):
    """An unfinished first stage is flagged (1 of mnist-lt's epochs; a selected epoch 2 of
    4 trained); a finished or early-stopped one is not; a tag folder named by hand is the
    epoch chosen, with no claim about its run."""
    cfg, ce, checkpoints = first_stage
    epochs = cfg.train.epochs
    assert epochs > 4

    def provenance(source: Path) -> dict:
        return init_from(JRCLNet(cfg.model, 10), second_stage(cfg, source), CLASSES)

    assert provenance(checkpoints) == {"checkpoint": str(checkpoints.resolve()), "epoch": 1, "run_epochs_trained": 1,
                                       "run_epochs": epochs, "run_complete": False}
    assert describe_provenance(provenance(checkpoints)) == (
        f"epoch 1 of {checkpoints.resolve()}, of a run that had trained only 1 of its {epochs} epochs")
    tag = checkpoints / "epoch_0001"
    assert provenance(tag) == {"checkpoint": str(tag.resolve()), "epoch": 1}
    done = write_run(tmp_path / "done", cfg, ce, epochs_done=epochs)
    assert provenance(done)["run_complete"] and provenance(done)["epoch"] == epochs
    assert describe_provenance(provenance(done)) == f"epoch {epochs} of {done.resolve()}"

    def selected(best: int, trained: int, stopped_early: bool) -> Selection:
        return Selection("val_balanced_accuracy", 2, best, 0.9, trained, stopped_early)

    going = write_run(tmp_path / "going", cfg, ce, epochs_done=4, selection=selected(2, 4, False))
    assert provenance(going) == {"checkpoint": str(going.resolve()), "epoch": 2, "run_epochs_trained": 4,
                                 "run_epochs": epochs, "run_complete": False}
    stopped = write_run(tmp_path / "stopped", cfg, ce, epochs_done=4, selection=selected(2, 4, True))
    assert provenance(stopped)["epoch"] == 2 and provenance(stopped)["run_complete"]
    fresh = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=None))
    assert init_from(JRCLNet(cfg.model, 10), fresh, CLASSES) is None


def test_a_resumed_run_keeps_the_provenance_its_checkpoint_holds(first_stage):
    """And a checkpoint written before checkpoints kept one names train.init_from, its epoch
    unknown, rather than pass for a run from random weights."""
    cfg, _, checkpoints = first_stage
    crt = second_stage(cfg, checkpoints)
    kept = {"checkpoint": "/runs/ce/checkpoints", "epoch": 7}
    assert resumed_provenance(crt, {INIT_FROM_KEY: kept}) == kept
    assert resumed_provenance(crt, {}) == {"checkpoint": str(checkpoints.resolve()), "epoch": None}
    assert describe_provenance(resumed_provenance(crt, {})) == f"an unrecorded epoch of {checkpoints.resolve()}"
    assert resumed_provenance(cfg, {INIT_FROM_KEY: None}) is None and resumed_provenance(cfg, {}) is None


def test_all_trainable_loads_every_weight_and_freezes_nothing(first_stage):
    cfg, ce, checkpoints = first_stage
    model = JRCLNet(cfg.model, 10)
    init_from(model, second_stage(cfg, checkpoints, "all"), CLASSES)
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ce.state_dict().items())


def test_mismatches_are_user_errors(first_stage, tmp_path):
    cfg, _, checkpoints = first_stage
    with pytest.raises(UserError, match="other classes"):
        init_from(JRCLNet(cfg.model, 10), second_stage(cfg, checkpoints), [c + "x" for c in CLASSES])
    wider = dataclasses.replace(cfg, model=dataclasses.replace(small_model_config(), projection_dim=16))
    with pytest.raises(UserError, match="another model section"):
        init_from(JRCLNet(wider.model, 10), second_stage(wider, checkpoints), CLASSES)
    with pytest.raises(UserError, match=r"^train\.init_from \S*nowhere does not exist; point it at a run's "
                                        r"checkpoints/ folder"):
        init_from(JRCLNet(cfg.model, 10), second_stage(cfg, tmp_path / "nowhere"), CLASSES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"^train\.init_from \S*empty holds no checkpoint; point it at a run's "
                                        r"checkpoints/ folder"):
        init_from(JRCLNet(cfg.model, 10), second_stage(cfg, tmp_path / "empty"), CLASSES)
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match=r"^train\.init_from \S*foreign\.pt is not a jrcl-fast checkpoint \(no 'module' "
                                        r"and 'config' entries\); point train\.init_from at a jrcl-fast run's"):
        init_from(JRCLNet(cfg.model, 10), second_stage(cfg, tmp_path / "foreign.pt"), CLASSES)
    with pytest.raises(UserError, match=rf"^train\.init_from \S*ce holds no checkpoint; point it at {checkpoints}, "
                                        "that run's checkpoints$"):  # the run folder, the likeliest slip
        init_from(JRCLNet(cfg.model, 10), second_stage(cfg, checkpoints.parent), CLASSES)
    (tmp_path / "unfinished" / CHECKPOINT_DIR).mkdir(parents=True)  # a run folder before its first epoch
    with pytest.raises(UserError, match=r"^train\.init_from \S*unfinished holds no checkpoint; point it at a run's "
                                        r"checkpoints/ folder \(its train\.output_dir/checkpoints\) after an epoch$"):
        init_from(JRCLNet(cfg.model, 10), second_stage(cfg, tmp_path / "unfinished"), CLASSES)
    (checkpoints / "latest").write_text("epoch_0009")  # names a folder that is gone
    with pytest.raises(UserError, match=rf"^train\.init_from {checkpoints}: its latest epoch's weights, "
                                        rf"{checkpoints}/epoch_0009/{MODEL_STATES}, are missing; point train\.init_from "
                                        rf"at another epoch folder in {checkpoints}$"):
        init_from(JRCLNet(cfg.model, 10), second_stage(cfg, checkpoints), CLASSES)
    (checkpoints / "latest").write_bytes(b"\xffepoch")  # a damaged file: a user error, not a UnicodeDecodeError
    with pytest.raises(UserError, match=r"^train\.init_from \S*: its latest epoch's weights, .* are missing"):
        init_from(JRCLNet(cfg.model, 10), second_stage(cfg, checkpoints), CLASSES)
    with pytest.raises(UserError, match="train.init_from"):
        load_config(REPO / "configs" / "mnist_lt.yaml", ["train.trainable=classifier"])


@pytest.mark.parametrize("key,value", [("name", "digits_lt"), ("split_seed", 1), ("test_fraction", 0.2),
                                       ("imbalance_ratio", 10.0)])
def test_a_first_stage_on_other_splits_is_refused(first_stage, key, value):
    """Its training images may be this run's validation or test images (another split_seed
    of animal-lt put 377 of the 2,000 test images in the first stage's training split)."""
    cfg, _, checkpoints = first_stage
    other = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **{key: value}))
    with pytest.raises(UserError, match=rf"was trained with data\.{key} \S+, this run has {value}: .* use the same "
                                        rf"data\.{key}$"):
        init_from(JRCLNet(cfg.model, 10), second_stage(other, checkpoints), CLASSES)


def test_crt_trains_the_classifier_of_a_ce_run(tmp_path, digits_root):
    """Stage 1: CE, instance sampling. Stage 2: cRT from its checkpoint. The backbone
    leaves stage 2 bit-identical; the re-balanced classifier raises balanced accuracy."""
    (tmp_path / "ce").mkdir()
    (tmp_path / "crt").mkdir()
    ce_cfg = tiny_config(tmp_path / "ce", digits_root, loss=CE_ONLY, train={"epochs": 4, "batch_size": 32,
                                                                              "threads": 2})
    done = run_cli("train", "--config", str(ce_cfg))
    assert done.returncode == 0, done.stderr
    ce_run = tmp_path / "ce" / "run"
    crt_cfg = tiny_config(tmp_path / "crt", digits_root, loss=CE_ONLY,
                          data={"image_size": 8, "sampler": "class_balanced"},
                          optim={"warmup_epochs": 0, "lr": 0.05},
                          train={"epochs": 3, "batch_size": 32, "threads": 2, "trainable": "classifier",
                                 "init_from": str(ce_run / CHECKPOINT_DIR)})
    done = run_cli("train", "--config", str(crt_cfg))
    assert done.returncode == 0, done.stderr
    assert f"from epoch 4 of {(ce_run / CHECKPOINT_DIR).resolve()}" in " ".join(done.stdout.split())
    ce_weights = read_model_states(ce_run / CHECKPOINT_DIR, "--checkpoint")["module"]
    crt_weights = read_model_states(tmp_path / "crt" / "run" / CHECKPOINT_DIR, "--checkpoint")["module"]
    assert ce_weights.keys() == crt_weights.keys()
    for key, value in ce_weights.items():
        assert torch.equal(crt_weights[key], value) != key.startswith("classifier."), key
    ce, crt = (json.loads((tmp_path / stage / "run" / "results.json").read_text()) for stage in ("ce", "crt"))
    assert crt["balanced_accuracy"] > ce["balanced_accuracy"]
    assert crt["shot_accuracy"]["few"] > ce["shot_accuracy"]["few"]
    assert "init_from" not in ce and crt["init_from"] == {
        "checkpoint": str((ce_run / CHECKPOINT_DIR).resolve()), "epoch": 4, "run_epochs_trained": 4,
        "run_epochs": 4, "run_complete": True}
    evaluated = run_cli("eval", "--checkpoint", str(tmp_path / "crt" / "run" / CHECKPOINT_DIR),
                        "--output-dir", str(tmp_path / "eval"))
    assert evaluated.returncode == 0, evaluated.stderr  # eval reports the provenance its checkpoint keeps
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["init_from"] == crt["init_from"]


def test_a_crt_run_resumes_after_its_first_stage_is_gone(tmp_path, digits_root, monkeypatch):
    """A resumed classifier-only stage takes every weight from its own checkpoint: it goes
    on with the first stage's folder deleted, its backbone still the first stage's."""
    def load(stage, **train):
        (tmp_path / stage).mkdir(exist_ok=True)
        return load_config(tiny_config(tmp_path / stage, digits_root, loss=CE_ONLY,
                                       train={"epochs": 2, "batch_size": 64, "threads": 1, **train}))

    ce_cfg = load("ce", epochs=1)
    dataset = load_dataset(ce_cfg.data)
    trainer.train(ce_cfg, dataset, False, False, Console(quiet=True))
    ce_weights = read_model_states(tmp_path / "ce" / "run" / CHECKPOINT_DIR, "--checkpoint")["module"]
    crt_cfg = load("crt", trainable="classifier", init_from=str(tmp_path / "ce" / "run" / CHECKPOINT_DIR))
    train_until_killed(crt_cfg, dataset, monkeypatch)
    after_epoch_1 = read_model_states(tmp_path / "crt" / "run" / CHECKPOINT_DIR, "--checkpoint")["module"]
    shutil.rmtree(tmp_path / "ce")
    console = Console(record=True, width=400)
    model, _, provenance = trainer.train(crt_cfg, dataset, True, False, console)
    assert f"(it started from epoch 1 of {(tmp_path / 'ce' / 'run' / CHECKPOINT_DIR).resolve()})" in console.export_text()
    assert provenance["init_from"]["checkpoint"] == str((tmp_path / "ce" / "run" / CHECKPOINT_DIR).resolve())
    assert provenance["init_from"]["epoch"] == 1 and provenance["init_from"]["run_complete"]
    assert read_model_states(tmp_path / "crt" / "run" / CHECKPOINT_DIR, "--checkpoint")["epochs_done"] == 2
    for key, value in model.state_dict().items():
        if key.startswith("classifier."):
            assert not torch.equal(value, after_epoch_1[key]), key  # epoch 2 trained it
        else:
            assert torch.equal(value, ce_weights[key]), key  # frozen, BatchNorm statistics included
