"""Test-wide setup. TRITON_INTERPRET must be set before any kernel module is imported
so that the Triton kernels run on the CPU under the interpreter."""

import gc
import os
import warnings
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def dali_threads() -> int:
    """How many of this process's threads DALI started (Linux names them "[DALI]...")."""
    count = 0
    for task in Path("/proc/self/task").glob("*"):
        try:
            count += (task / "comm").read_text().startswith("[DALI]")
        except OSError:  # the thread ended while we looked
            continue
    return count


@pytest.fixture(autouse=True)
def release_dali_pipelines():
    """A DALI pipeline a test dropped keeps its threads until the garbage collector runs. A later
    test that forks (a DataLoader worker, a torchrun) then copies a process whose DALI threads may
    hold locks, and the child can deadlock: two CI runs hung that way. Collect them after the test."""
    yield
    if dali_threads():
        gc.collect()
        if alive := dali_threads():  # still referenced (a kept traceback, a global): a later fork may hang
            warnings.warn(f"{alive} DALI threads outlive this test; a later fork may deadlock", stacklevel=1)


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """A digits-lt cache shared by the whole session (written once)."""
    from jrcl_fast.data.sets.digits_lt import prepare_digits_lt

    root = tmp_path_factory.mktemp("digits_cache")
    prepare_digits_lt(root)
    return root


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory):
    """An mnist-lt cache shared by the whole session (written once)."""
    from jrcl_fast.data.sets.mnist_lt import prepare_mnist_lt

    root = tmp_path_factory.mktemp("mnist_cache")
    prepare_mnist_lt(root, 100, seed=0)
    return root
