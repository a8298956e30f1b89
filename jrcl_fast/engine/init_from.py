"""Start a run from another run's weights (train.init_from), optionally retraining only
the classifier on frozen features (train.trainable=classifier).

The classifier-only stage is classifier re-training, cRT (Kang et al., "Decoupling
Representation and Classifier for Long-Tailed Recognition", ICLR 2020): the first run
learns the representation with plain CE and instance sampling; the second keeps every
weight of it (backbone, projection, binary head, prototypes) and its BatchNorm
statistics fixed, re-initialises the classifier, and trains it alone, usually with
data.sampler=class_balanced and the auxiliary losses off (loss.lambda_* = 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from jrcl_fast.checkpoint import (
    INIT_FROM_KEY,
    REVISION_KEY,
    latest_tag,
    read_selected_model_states,
    run_epochs_trained,
    training_finished,
)
from jrcl_fast.config import Config, DataConfig, parse_config
from jrcl_fast.errors import UserError
from jrcl_fast.models import JRCLNet, check_architecture

CLASSIFIER = "classifier"  # the JRCLNet submodule the classifier-only stage trains
# The data keys that decide which image lands in which split: a first stage trained on
# another split may have trained on this run's validation or test images.
SPLIT_KEYS = ("name", "split_seed", "test_fraction", "imbalance_ratio")


def keep_eval(module: nn.Module) -> None:
    """Keep `module` (and everything under it) in eval mode whatever .train() its parent
    is given: the trainer puts the whole model in train mode every epoch, which would let
    frozen BatchNorms update their running statistics from the retraining batches."""
    module.register_forward_pre_hook(_to_eval)
    module.eval()


def _to_eval(module: nn.Module, inputs: tuple) -> None:
    if module.training:
        module.eval()  # returns the module, which a pre-hook must not: it would replace the inputs


def read_first_stage(source: Path, cfg: Config, class_names: list[str]) -> tuple[dict[str, Any], Config]:
    """The model states of the epoch the run at `source` selected, and that run's config,
    checked to fit `cfg`'s network and to come from the same splits of the same data set."""
    saved = read_selected_model_states(source, "train.init_from")
    if saved.get("class_names") != class_names:
        raise UserError(f"train.init_from {source} was trained on other classes than {cfg.data.name}'s; "
                        "start from a run on the same data set")
    check_architecture(saved.get(REVISION_KEY), cfg.model, f"train.init_from {source}")
    first_stage = parse_config(saved["config"], str(source))
    check_same_splits(first_stage.data, cfg.data, source)
    if first_stage.model != cfg.model:
        raise UserError(f"train.init_from {source} was trained with another model section; "
                        "use the same model.* keys as that run")
    return saved, first_stage


def provenance(source: Path, saved: dict[str, Any], first_stage: Config) -> dict[str, Any]:
    """Where the starting weights came from, for the checkpoints and results.json: the
    epoch loaded and, from a run's checkpoints/ folder, how far that run had got (a first
    stage may still be training); a tag folder named by hand is the epoch the user chose.
    A first stage that itself started from another run brings that provenance along."""
    record = {"checkpoint": str(source.resolve()), "epoch": saved.get("epochs_done")}
    if latest_tag(source):
        record |= {"run_epochs_trained": run_epochs_trained(saved), "run_epochs": first_stage.train.epochs,
                   "run_complete": training_finished(saved)}
    if saved.get(INIT_FROM_KEY):
        record[INIT_FROM_KEY] = saved[INIT_FROM_KEY]
    return record


def resumed_provenance(cfg: Config, saved: dict[str, Any]) -> dict[str, Any] | None:
    """The provenance a resumed run's checkpoint keeps. One written before checkpoints kept
    it names train.init_from with the epoch unknown, rather than claim a random start."""
    if INIT_FROM_KEY in saved:
        return saved[INIT_FROM_KEY]
    return None if cfg.train.init_from is None else {"checkpoint": str(Path(cfg.train.init_from).resolve()),
                                                      "epoch": None}


def describe_provenance(source: dict[str, Any]) -> str:
    """`provenance` in words, for the log."""
    epoch = "an unrecorded epoch" if source["epoch"] is None else f"epoch {source['epoch']}"
    unfinished = "" if source.get("run_complete") is not False else (
        f", of a run that had trained only {source['run_epochs_trained']} of its {source['run_epochs']} epochs")
    return f"{epoch} of {source['checkpoint']}{unfinished}"


def check_same_splits(first_stage: DataConfig, data: DataConfig, source: Path) -> None:
    """Refuse a first stage whose training split may hold this run's held-out images."""
    for key in SPLIT_KEYS:
        theirs, ours = getattr(first_stage, key), getattr(data, key)
        if theirs != ours:
            raise UserError(f"train.init_from {source} was trained with data.{key} {theirs}, this run has {ours}: "
                            "its training images may be this run's validation or test images; use the same "
                            f"data.{key}")


def freeze_all_but_classifier(model: JRCLNet) -> None:
    """No gradient, and eval mode, for every part of `model` but its classifier."""
    for name, child in model.named_children():
        if name != CLASSIFIER:
            child.requires_grad_(False)
            keep_eval(child)
    for param in model.parameters(recurse=False):  # free prototypes
        param.requires_grad_(False)


def init_from(model: JRCLNet, cfg: Config, class_names: list[str], resuming: bool = False) -> dict[str, Any] | None:
    """Load train.init_from's selected weights into `model` (fresh, random) and, with
    train.trainable=classifier, freeze all but the classifier, which keeps its fresh
    initialisation; returns their provenance. A resumed run only freezes (and returns
    None): its own checkpoint holds every weight and the provenance, and the first stage may
    be gone by then. Does nothing without train.init_from."""
    if cfg.train.init_from is None:
        return None
    if cfg.train.trainable == CLASSIFIER:
        freeze_all_but_classifier(model)
    if resuming:
        return None
    source = Path(cfg.train.init_from)
    saved, first_stage = read_first_stage(source, cfg, class_names)
    weights = saved["module"]
    if cfg.train.trainable == CLASSIFIER:
        weights = {k: v for k, v in weights.items() if not k.startswith(f"{CLASSIFIER}.")}
    # The model sections are equal, so only the classifier's keys can be missing.
    model.load_state_dict(weights, strict=cfg.train.trainable != CLASSIFIER)
    return provenance(source, saved, first_stage)
