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

import pytest
import torch
from torch import Tensor

from jrcl_fast.kernels import _common

# Compiles each spec (module, kernel name, argument types, constexprs, num_warps) to a
# cubin for sm_90 with Triton's bundled ptxas; no GPU needed.
_COMPILE_SCRIPT = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
for module, name, types, constexprs, num_warps in json.load(sys.stdin):
    fn = getattr(importlib.import_module(module), name)
    signature = {arg: "constexpr" if arg in constexprs else types[arg] for arg in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
"""


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


def compile_for_sm90(specs: list[tuple[str, str, dict[str, str], dict[str, object], int]]) -> None:
    """The interpreter skips Triton's type checks, layouts and register allocation: this
    runs the real compiler (in a subprocess, as the interpreter mode is fixed at import)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], input=json.dumps(specs), env=env,
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
