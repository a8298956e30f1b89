"""Atomic writes create files with the permissions an ordinary write would have."""

import os
import stat

import numpy as np
import pytest
from rich.console import Console

from jrcl_fast.atomic import atomic_write_bytes
from jrcl_fast.checkpoint import save_model_states
from jrcl_fast.evaluation.evaluate import PLOT_NAME, RESULTS_NAME, publish
from jrcl_fast.evaluation.metrics import classification_metrics


@pytest.fixture(params=[0o022, 0o027, 0o002, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode_of(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_files_get_the_mode_of_an_ordinary_write(tmp_path, umask):
    (tmp_path / "ordinary").write_bytes(b"x")
    atomic_write_bytes(tmp_path / "atomic", lambda f: f.write(b"x"))
    atomic_write_bytes(tmp_path / "ordinary", lambda f: f.write(b"y"))  # replacing keeps the same rule
    assert mode_of(tmp_path / "atomic") == mode_of(tmp_path / "ordinary") == 0o666 & ~umask
    assert os.umask(umask) == umask  # the writer leaves the process umask as it was


def test_results_plot_and_checkpoint_are_readable_by_the_group(tmp_path, umask):
    labels = np.array([0, 1, 1])
    results = classification_metrics(labels, labels, np.array([2, 1]), {"many": [0], "medium": [], "few": [1]},
                                     ["a", "b"])
    publish(results, tmp_path, "toy", Console(quiet=True))
    save_model_states(tmp_path / "checkpoints" / "epoch_0001" / "weights.pt", {"w": 1})
    for path in (tmp_path / RESULTS_NAME, tmp_path / PLOT_NAME, tmp_path / "checkpoints/epoch_0001/weights.pt"):
        assert mode_of(path) == 0o666 & ~umask, path
