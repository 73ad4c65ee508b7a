"""Shared test settings: deterministic seeds, one torch thread, a quiet matplotlib backend."""

import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
# Tiny tensors: thread pools cost more than they give, and CI machines are shared.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test on one torch thread, restored afterwards (a test may change it): on a busy
    2-core machine OpenMP spinning makes tiny ops many times slower with 2 threads."""
    from tiny_zoo import one_thread

    with one_thread():
        yield


@pytest.fixture(scope="session")
def zoo_path(tmp_path_factory) -> str:
    """The tiny digits zoo of ``tests/tiny_zoo.py`` (MLP and CNN groups), built once per run."""
    from tiny_zoo import build_tiny_zoo

    return build_tiny_zoo(str(tmp_path_factory.getbasetemp() / "tiny_zoo.h5"))
