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
