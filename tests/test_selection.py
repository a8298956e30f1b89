"""Model selection on validation (train.select_on) and early stopping: which epoch is
kept, that its weights are the ones returned and evaluated, and that --resume respects it."""

import dataclasses
import json

import pytest
import torch
from helpers import tiny_config
from rich.console import Console

from jrcl_fast.checkpoint import (
    SELECTION_KEY,
    read_model_states,
    read_selected_model_states,
    run_epochs_trained,
    training_finished,
)
from jrcl_fast.config import load_config
from jrcl_fast.data.catalog import load_dataset
from jrcl_fast.engine.selection import Selection
from jrcl_fast.engine.trainer import train
from jrcl_fast.errors import UserError


def test_the_best_epoch_is_kept_and_ties_keep_the_earliest():
    selection = Selection("val_balanced_accuracy", patience=2)
    kept = [selection.update(epoch, value) for epoch, value in enumerate([0.5, 0.7, 0.6, 0.7], start=1)]
    assert kept == [True, True, False, False]
    assert (selection.best_epoch, selection.best_value, selection.stopped_early) == (2, 0.7, True)
    summary = selection.summary()
    assert "best validation balanced accuracy (0.7000) of 4 epochs" in summary["reason"]
    assert Selection.from_summary(summary) == selection

    last = Selection("last", patience=0)
    for epoch in (1, 2, 3):
        last.update(epoch, None)
    assert (last.best_epoch, last.stopped_early) == (3, False)


def test_a_run_has_finished_after_its_epochs_or_an_early_stop():
    """What train.init_from's provenance and the ablation runner ask of a latest
    checkpoint, from Selection's own summaries at random lengths."""
    epochs = int(torch.randint(3, 9, ()))

    def client_state(epochs_done: int, patience: int = 0, values=None) -> dict:
        selection = Selection("val_balanced_accuracy" if values else "last", patience)
        for epoch in range(1, epochs_done + 1):
            selection.update(epoch, None if values is None else values[epoch - 1])
        return {"epochs_done": epochs_done, "config": {"train": {"epochs": epochs}}, SELECTION_KEY: selection.summary()}

    short = int(torch.randint(1, epochs, ()))
    assert not training_finished(client_state(short)) and run_epochs_trained(client_state(short)) == short
    assert training_finished(client_state(epochs))
    falling = [1.0 - 0.1 * epoch for epoch in range(epochs)]  # no better score after epoch 1: patience 1 stops at 2
    stopped = client_state(2, patience=1, values=falling)
    assert stopped[SELECTION_KEY]["stopped_early"] and training_finished(stopped)
    # the selected epoch's folder: its own epoch is 1, the run had trained 2 when it stopped
    assert run_epochs_trained({**stopped, "epochs_done": 1}) == 2 and training_finished({**stopped, "epochs_done": 1})
    # written before runs kept a selection: its own epoch counts
    old = {"epochs_done": epochs, "config": {"train": {"epochs": epochs}}}
    assert training_finished(old) and not training_finished({**old, "epochs_done": short})


def test_early_stopping_keeps_the_selected_epochs_weights(tmp_path, digits_root):
    cfg = load_config(tiny_config(tmp_path, digits_root, train={"epochs": 6, "batch_size": 32, "threads": 1,
                                                                 "select_on": "val_balanced_accuracy",
                                                                 "early_stop_patience": 2}))
    dataset = load_dataset(cfg.data)
    dataset = dataclasses.replace(dataset, val=dataset.test)  # digits-lt has no validation split
    scores = iter([0.1, 0.3, 0.2, 0.25, 0.9, 0.9])  # best at epoch 2; epochs 3, 4 do not beat it
    seen = []

    def validate(model, device):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scores)

    model, _, provenance = train(cfg, dataset, False, False, Console(quiet=True), validate=validate)
    assert provenance.keys() == {SELECTION_KEY}  # and no init_from: this run started from random weights
    selection = provenance[SELECTION_KEY]
    assert len(seen) == 4 and selection["stopped_early"] and selection["epochs_trained"] == 4
    assert selection["best_epoch"] == 2 and selection["best_value"] == 0.3
    for name, value in model.state_dict().items():  # the returned model is epoch 2's, not epoch 4's
        torch.testing.assert_close(value, seen[1][name], rtol=0, atol=0)

    ckpt = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch_0002", "epoch_0004", "latest"]
    selected = read_selected_model_states(ckpt, "--checkpoint")  # what `jrcl-fast eval` loads
    assert selected["epochs_done"] == 2 and selected[SELECTION_KEY] == selection
    assert read_model_states(ckpt, "--checkpoint")["epochs_done"] == 4
    with pytest.raises(UserError, match="is complete .stopped early after epoch 4"):
        train(cfg, dataset, True, False, Console(quiet=True), validate=validate)


def test_selection_on_validation_needs_a_validation_split(tmp_path, digits_root):
    cfg = load_config(tiny_config(tmp_path, digits_root, train={"select_on": "val_balanced_accuracy"}))
    with pytest.raises(UserError, match="train.select_on=val_balanced_accuracy chooses on the validation split, "
                                        "and digits_lt has none; use train.select_on=last"):
        train(cfg, load_dataset(cfg.data), False, False, Console(quiet=True), validate=lambda *_: 0.0)
    with pytest.raises(UserError, match="'train.early_stop_patience' stops on the validation score"):
        load_config(tiny_config(tmp_path, digits_root, train={"early_stop_patience": 3}))


def test_eval_of_another_epochs_folder_does_not_claim_the_selection(tmp_path, digits_root):
    """`jrcl-fast eval --checkpoint RUN/checkpoints/epoch_0004` tests epoch 4: the run's
    selection (epoch 2) is not written into its results."""
    from helpers import run_cli

    cfg = load_config(tiny_config(tmp_path, digits_root, train={"epochs": 4, "batch_size": 64, "threads": 1,
                                                                 "select_on": "val_balanced_accuracy"}))
    loaded = load_dataset(cfg.data)
    dataset = dataclasses.replace(loaded, val=loaded.test)
    scores = iter([0.1, 0.3, 0.2, 0.25])
    train(cfg, dataset, False, False, Console(quiet=True), validate=lambda *_: next(scores))
    ckpt = tmp_path / "run" / "checkpoints"
    for folder, claims in ((ckpt, True), (ckpt / "epoch_0004", False)):
        out = tmp_path / folder.name
        done = run_cli("eval", "--checkpoint", str(folder), "--output-dir", str(out))
        assert done.returncode == 0, done.stderr
        results = json.loads((out / "results.json").read_text())
        assert ("selection" in results) == claims
    (ckpt / "epoch_0002" / "mp_rank_00_model_states.pt").unlink()
    (ckpt / "epoch_0002").rmdir()
    done = run_cli("eval", "--checkpoint", str(ckpt))
    assert done.returncode == 2 and "the weights of the selected epoch 2" in done.stderr


class _Interrupted(Exception):
    """Stands in for a kill between two epochs' validations."""


def test_a_resumed_run_keeps_the_selection_made_before_it_stopped(tmp_path, digits_root):
    """Interrupted after epoch 2 and resumed, a run selecting on validation keeps epoch 2
    (score 0.5) against the later, lower scores, returns epoch 2's weights, and ends with
    the selection and checkpoints of the run that was never interrupted."""
    scores = [0.1, 0.5, 0.2, 0.4]  # best at epoch 2; epoch 4 is the best after a resume

    def run(name, resume, stop_at=None):
        cfg = load_config(tiny_config(tmp_path / name, digits_root, train={
            "epochs": len(scores), "batch_size": 64, "threads": 1, "select_on": "val_balanced_accuracy"}))
        dataset = load_dataset(cfg.data)
        dataset = dataclasses.replace(dataset, val=dataset.test)  # digits-lt has no validation split
        seen = []

        def validate(model, device):
            epoch = len(seen) + (2 if resume else 0) + 1
            if epoch == stop_at:
                raise _Interrupted
            seen.append({k: v.clone() for k, v in model.state_dict().items()})
            return scores[epoch - 1]

        return train(cfg, dataset, resume, False, Console(quiet=True), validate=validate), seen

    (tmp_path / "straight").mkdir()
    (tmp_path / "stopped").mkdir()
    (straight_model, _, straight), straight_seen = run("straight", False)
    with pytest.raises(_Interrupted):
        run("stopped", False, stop_at=3)
    assert read_model_states(tmp_path / "stopped" / "run" / "checkpoints", "--checkpoint")["epochs_done"] == 2
    (model, _, provenance), seen = run("stopped", True)
    assert len(seen) == 2  # epochs 3 and 4
    selection = provenance[SELECTION_KEY]
    assert provenance == straight and selection["best_epoch"] == 2 and selection["best_value"] == 0.5
    for name, value in model.state_dict().items():  # epoch 2's weights, as the straight run's
        torch.testing.assert_close(value, straight_model.state_dict()[name], rtol=0, atol=0)
        torch.testing.assert_close(value, straight_seen[1][name], rtol=0, atol=0)
    names = {run: sorted(p.name for p in (tmp_path / run / "run" / "checkpoints").iterdir())
             for run in ("straight", "stopped")}
    assert names["stopped"] == names["straight"] == ["epoch_0002", "epoch_0004", "latest"]
