"""Start-up pieces: the phase lines, the default of data.num_workers per local rank, and the
kernels phase's choice of loss implementation (the GPU's rule, checked on the CPU)."""

from __future__ import annotations

import io
import os
import re
import sys

import pytest
import torch
from rich.console import Console

from jrcl_fast.config import parse_config
from jrcl_fast.cores import available_cores, workers_per_rank
from jrcl_fast.errors import UserError
from jrcl_fast.losses import dispatch
from jrcl_fast.startup import phase


def test_each_phase_prints_one_line_with_its_time_and_a_failing_one_none() -> None:
    screen = io.StringIO()
    console = Console(file=screen, width=80)
    with phase(console, "metadata") as shown:
        shown.detail = "8,142 classes"
    with pytest.raises(KeyError), phase(console, "model"):
        raise KeyError("boom")
    with phase(console, "loaders"):
        pass
    lines = screen.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert re.fullmatch(r"  metadata +\d+\.\d s  8,142 classes", lines[0])
    assert re.fullmatch(r"  loaders +\d+\.\d s  ", lines[1])


@pytest.mark.parametrize(("variable", "cores", "ranks", "expected"),
                         [(None, 2, None, 2), ("LOCAL_WORLD_SIZE", 16, "4", 4), ("LOCAL_SIZE", 16, "8", 2),
                          ("LOCAL_WORLD_SIZE", 4, "8", 0), ("LOCAL_SIZE", 6, "oops", 6)])
def test_workers_default_to_the_cores_per_local_rank(monkeypatch, variable, cores, ranks, expected) -> None:
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    if variable:
        monkeypatch.setenv(variable, ranks)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(100, 100 + cores)))  # not 0..n-1
    assert available_cores() == cores
    workers, why = workers_per_rank(None)
    assert workers == expected and why.startswith(f"default: {cores} cores")
    assert workers_per_rank(3) == (3, f"data.num_workers; {why.removeprefix('default: ')}")


def test_num_workers_is_unset_by_default_and_still_refuses_a_negative_value() -> None:
    assert parse_config({"data": {"name": "digits_lt", "root": "x"}}, "c.yaml").data.num_workers is None
    assert parse_config({"data": {"name": "digits_lt", "root": "x", "num_workers": None}}, "c.yaml").data.num_workers \
        is None
    with pytest.raises(UserError, match="'data.num_workers' must not be negative"):
        parse_config({"data": {"name": "digits_lt", "root": "x", "num_workers": -1}}, "c.yaml")


def test_the_kernels_phase_names_what_runs_and_imports_it() -> None:
    cpu = torch.device("cpu")
    # auto takes the kernels only on CUDA tensors (dispatch.select_impl): the reference here
    assert dispatch.load_implementations("auto", cpu) == "PyTorch reference losses (loss.backend=auto)"
    assert dispatch.load_implementations("triton", cpu) == ("fused Triton kernels (loss.backend=triton, "
                                                            "Triton interpreter)")
    assert {"jrcl_fast.kernels.o2a", "jrcl_fast.kernels.ce_bdc"} <= sys.modules.keys()
