"""Evaluating generated networks on their target task (classifiers of the zoo's data).

:func:`classifier_accuracy` runs every network of a :class:`WeightSpace` through the target
architecture (``build_module(arch)``) on the test split of the data the zoo was trained on (any
provider of :mod:`metanet.data.tasks`, as recorded by the zoo), optionally only on the test
samples of some classes (a condition's task).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from metanet.weightspace import WeightSpace

__all__ = ["can_evaluate", "classifier_accuracy", "load_test_split"]


def can_evaluate(info: Mapping[str, Any]) -> bool:
    """Whether a generator's target task is a classifier zoo whose data this machine can read
    (the zoo records its data provider)."""
    zoo = info.get("zoo_info") or {}
    return zoo.get("kind") == "classifier" and bool(info.get("arch"))


def load_test_split(info: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Test inputs (shaped for the generator's arch) and labels of the data its zoo was trained
    on (``zoo_info["data"]``: the digits split or any provider, with its fingerprint checked).

    Raises:
        metanet.data.tasks.TaskDataError: the data cannot be read here, or it changed.
    """
    from metanet.zoo.architectures import input_shape
    from metanet.zoo.data import in_memory, recipe_task

    data = (info.get("zoo_info") or {}).get("data") or {"split_seed": 0, "test_fraction": 0.25}
    x, y = in_memory(recipe_task(data).test, "test")
    return x.reshape(len(x), *input_shape(info["arch"])), y


@torch.no_grad()
def classifier_accuracy(
    ws: WeightSpace,
    arch: Mapping[str, Any],
    x: torch.Tensor,
    y: torch.Tensor,
    classes: Sequence[int] | None = None,
) -> torch.Tensor:
    """Test accuracy ``[B]`` of every network of ``ws`` loaded into ``build_module(arch)``.

    Args:
        ws: ``B`` networks of the arch's spec.
        arch: arch dict of the target architecture.
        x, y: test inputs (shaped for the arch) and labels.
        classes: evaluate only on test images of these classes (prediction still over all
            outputs); ``None``: all images.
    """
    from metanet.zoo.architectures import build_module

    if classes is not None:
        keep = torch.isin(y, torch.as_tensor(list(classes), dtype=y.dtype))
        x, y = x[keep], y[keep]
    module = build_module(dict(arch)).eval()
    accs = torch.empty(len(ws))
    for i in range(len(ws)):
        ws.load_into(module, i)
        out = module(x)
        accs[i] = (out.argmax(1) == y).float().mean() if torch.isfinite(out).all() else 0.0
    return accs
