"""Test-wide setup. TRITON_INTERPRET must be set before any kernel module is imported
so that the Triton kernels run on the CPU under the interpreter."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
