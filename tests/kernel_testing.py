"""Helpers shared by the kernel tests: the poisoned-output fixture (imported by the
test files, which activates it there), a half-precision comparison and an
ahead-of-time compile for a GPU target."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from torch import Tensor

from jrcl_fast.kernels import _common

# Compiles the kernels of benchmarks/kernel_sass.py's specs for sm_90 with Triton's
# bundled ptxas, as a launch would specialise them; no GPU needed. Each request is
# (loss, keyword arguments of kernel_sass.<loss>_specs, constexprs to override).
_COMPILE_SCRIPT = """
import dataclasses, json, sys
sys.path.insert(0, sys.argv[1])
import kernel_sass
for loss, kwargs, overrides in json.load(sys.stdin):
    for spec in getattr(kernel_sass, f"{loss}_specs")(**kwargs):
        flags = {**spec.constexprs, **{k: v for k, v in overrides.items() if k in spec.constexprs}}
        kernel_sass.compile_sm90(dataclasses.replace(spec, constexprs=flags))
"""
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def poisoned_random_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh seed per test, printed so a failure can be replayed, and kernel output
    buffers that start as NaN so a match with the reference proves full coverage."""
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    print(f"torch seed {seed}")


def assert_close_to_largest(got: Iterable[Tensor], want: Iterable[Tensor], tol: float) -> None:
    """Finite, same dtype, and within tol of the reference relative to its largest
    entry: half-precision results are rounded on store (and O2A gradients go through
    a half-precision dS tile), so small entries carry the large entries' absolute error."""
    for g, w in zip(got, want, strict=True):
        assert torch.isfinite(g).all() and g.dtype == w.dtype
        torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol * w.float().abs().max().item())


def compile_for_sm90(requests: list[tuple[str, dict[str, object], dict[str, object]]]) -> None:
    """The interpreter skips Triton's type checks, layouts and register allocation: this
    runs the real compiler (in a subprocess, as the interpreter mode is fixed at import)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, str(BENCHMARKS)], input=json.dumps(requests), env=env,
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
