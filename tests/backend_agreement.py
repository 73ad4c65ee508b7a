"""Shared check of the fused-kernel tests: a graph metanetwork computes the same outputs and
parameter gradients under the "auto" backend (fused C kernels) and the "native" one (separate
PyTorch reductions)."""

from __future__ import annotations

import torch
from torch_geometric.data import Batch

from metanet import ops
from metanet.graph import from_module


def mlp_batch(seed: int, hidden: int = 7, count: int = 3) -> Batch:
    """A batch of ``count`` small trained-looking ReLU MLPs' parameter graphs."""
    torch.manual_seed(seed)
    nets = [torch.nn.Sequential(torch.nn.Linear(5, hidden), torch.nn.ReLU(),
                                torch.nn.Linear(hidden, 3)) for _ in range(count)]  # fmt: skip
    return Batch.from_data_list([from_module(net) for net in nets])


def assert_backends_agree(model: torch.nn.Module, batch: Batch) -> None:
    """Outputs and every parameter's gradient of ``model(batch)`` match across backends."""
    model.calibrate(batch)
    results = {}
    for name in ("auto", "native"):
        model.zero_grad()
        with ops.use_backend(name):
            out = model(batch)
        out.square().sum().backward()
        results[name] = (out.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(results["auto"][0], results["native"][0], atol=1e-5, rtol=1e-4)
    for a, b in zip(results["auto"][1], results["native"][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
