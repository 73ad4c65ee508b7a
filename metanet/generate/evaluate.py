"""Evaluating generated networks on their target task (digits classifiers).

:func:`digits_accuracy` runs every network of a :class:`WeightSpace` through the target
architecture (``build_module(arch)``) on the digits test split recorded by the zoo, optionally
only on the test images of some classes (a condition's task).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from metanet.weightspace import WeightSpace

__all__ = ["digits_accuracy", "digits_available", "load_test_split"]


def digits_available(info: Mapping[str, Any]) -> bool:
    """Whether a generator's target task is a digits classifier we can evaluate here."""
    zoo = info.get("zoo_info") or {}
    arch = info.get("arch") or {}
    return zoo.get("kind") == "classifier" and arch.get("type") in ("mlp", "cnn")


def load_test_split(info: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits test images (shaped for the arch) and labels, with the zoo's recorded split."""
    from metanet.data.digits import DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION, load_digits
    from metanet.zoo.architectures import input_shape

    data = (info.get("zoo_info") or {}).get("data") or {}
    digits = load_digits(
        int(data.get("split_seed", DIGITS_SPLIT_SEED)),
        float(data.get("test_fraction", DIGITS_TEST_FRACTION)),
    )
    x = digits.x_test.reshape(len(digits.x_test), *input_shape(info["arch"]))
    return x, digits.y_test


@torch.no_grad()
def digits_accuracy(
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
