"""Evaluating generated networks on their target task (classifiers of the zoo's data).

:func:`classifier_accuracy` runs every network of a :class:`WeightSpace` through the target
architecture (``build_module(arch)``) on the test split of the data the zoo was trained on (any
provider of :mod:`metanet.data.tasks`, as recorded by the zoo), optionally only on the test
samples of some classes (a condition's task).

Selection on validation (nothing is chosen on the test split): :func:`load_eval_splits` gives a
validation split (the zoo data's own ``val`` split, which the zoo's networks never trained on, or
else a seeded half of its test split, the other half becoming the test split) and a test split;
:func:`accuracy_summary` reports the median and mean test accuracy of *all* generated networks,
with best-of-N (the network of each group of N with the best validation accuracy, its test
accuracy; :func:`best_of_n`) only beside them. Novelty against the training checkpoints lives in
:mod:`metanet.generate.novelty`, the baselines in :mod:`metanet.generate.baselines`.

Networks of any module family: a generator of a :class:`~metanet.generate.data.FlatLayout`
(CNNs with BatchNorm, user modules) writes flat parameter vectors; :func:`load_network` loads one
into the module (with the layout's buffers: the zoo's average BatchNorm running statistics), and
``calibration=`` batches (:func:`calibration_batches`: ``K`` batches of the zoo data's *train*
split) recompute every BatchNorm layer's running statistics after loading
(:func:`metanet.hyper.calibrate.calibrate_batchnorm`) before the network is scored::

    layout = network_layout(gen.info)
    batches = calibration_batches(gen.info, 8)
    acc = classifier_accuracy(ws, gen.info["arch"], x, y, layout=layout, calibration=batches)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from metanet.weightspace import WeightSpace

__all__ = [
    "EvalSplits",
    "accuracy_summary",
    "best_of_n",
    "calibration_batches",
    "can_evaluate",
    "classifier_accuracy",
    "load_eval_splits",
    "load_network",
    "load_test_split",
]


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


@dataclass
class EvalSplits:
    """Validation and test samples of a generator's target task.

    ``source`` says where the validation split came from: ``"val"`` (the data's own validation
    split; ``x_test`` is the whole test split) or ``"test half"`` (a seeded half of the test split;
    ``x_test`` is the other half).
    """

    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source: str


def load_eval_splits(info: Mapping[str, Any], seed: int = 0) -> EvalSplits:
    """Validation and test splits of the data the generator's zoo was trained on (see
    :class:`EvalSplits`); inputs shaped for ``info["arch"]``.

    Raises:
        metanet.data.tasks.TaskDataError: the data cannot be read here, or it changed.
    """
    from metanet.zoo.architectures import input_shape
    from metanet.zoo.data import in_memory, recipe_task

    data = (info.get("zoo_info") or {}).get("data") or {"split_seed": 0, "test_fraction": 0.25}
    task = recipe_task(data)
    shape = input_shape(info["arch"])
    x, y = in_memory(task.test, "test")
    x = x.reshape(len(x), *shape)
    if task.val is not None:
        xv, yv = in_memory(task.val, "val")
        return EvalSplits(xv.reshape(len(xv), *shape), yv, x, y, "val")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    half = len(y) // 2
    v, t = perm[:half].sort().values, perm[half:].sort().values
    return EvalSplits(x[v], y[v], x[t], y[t], "test half")


def best_of_n(val_acc: torch.Tensor, test_acc: torch.Tensor, n: int) -> torch.Tensor:
    """Test accuracy of the best-by-validation network of each consecutive group of ``n``
    networks (``[len // n]``; a trailing partial group is dropped)."""
    if val_acc.shape != test_acc.shape or val_acc.dim() != 1:
        raise ValueError(
            f"val_acc and test_acc must be [B], got {tuple(val_acc.shape)} and "
            f"{tuple(test_acc.shape)}"
        )
    groups = len(val_acc) // n if n >= 1 else 0
    if groups == 0:
        raise ValueError(f"best of {n} needs at least {max(n, 1)} networks, got {len(val_acc)}")
    v = val_acc[: groups * n].view(groups, n)
    t = test_acc[: groups * n].view(groups, n)
    return t.gather(1, v.argmax(1, keepdim=True)).squeeze(1)


def accuracy_summary(
    val_acc: torch.Tensor, test_acc: torch.Tensor, best_of: Sequence[int] = (10,)
) -> dict[str, float]:
    """Median and mean test accuracy of all networks, and for each N of ``best_of`` the mean
    test accuracy of the best-by-validation network of groups of N (``best_of_<N>``; N larger
    than the batch is skipped)."""
    out = {"median": float(test_acc.median()), "mean": float(test_acc.mean())}
    for n in best_of:
        if 1 <= n <= len(test_acc):
            out[f"best_of_{n}"] = float(best_of_n(val_acc, test_acc, n).mean())
    return out


def calibration_batches(
    info: Mapping[str, Any], num_batches: int, batch_size: int = 64, seed: int = 0
) -> list[torch.Tensor]:
    """``num_batches`` input batches ``[batch_size, *input_shape]`` of the *train* split of the
    data the generator's zoo was trained on (seeded order), for recalibrating BatchNorm running
    statistics after generation (``calibration=`` of :func:`classifier_accuracy`).

    Raises:
        metanet.data.tasks.TaskDataError: the data cannot be read here, or it changed.
        metanet.hyper.calibrate.CalibrationError: ``num_batches`` or ``batch_size`` below 1.
    """
    from metanet.hyper.calibrate import task_batches
    from metanet.zoo.architectures import input_shape
    from metanet.zoo.data import recipe_task

    data = (info.get("zoo_info") or {}).get("data") or {"split_seed": 0, "test_fraction": 0.25}
    shape = tuple(input_shape(info["arch"]))
    return list(task_batches(recipe_task(data), num_batches, batch_size, seed, shape))


def load_network(
    module: nn.Module,
    ws: WeightSpace,
    index: int,
    layout: Any = None,
    calibration: Sequence[torch.Tensor] | None = None,
) -> nn.Module:
    """Load network ``index`` of ``ws`` into ``module`` (in place; returned): through ``layout``
    (a :class:`~metanet.generate.data.FlatLayout`: parameters and the layout's buffers) or, when
    ``None``, the weight space (``ws.load_into``). With ``calibration`` batches the module's
    BatchNorm running statistics are then recomputed on them
    (:func:`~metanet.hyper.calibrate.calibrate_batchnorm`; a no-op without BatchNorm)."""
    if layout is None:
        ws.load_into(module, index)
    else:
        layout.load_into(module, ws[index].flatten()[0])
    if calibration:
        from metanet.hyper.calibrate import calibrate_batchnorm

        calibrate_batchnorm(module, calibration)
    return module


@torch.no_grad()
def classifier_accuracy(
    ws: WeightSpace,
    arch: Mapping[str, Any],
    x: torch.Tensor,
    y: torch.Tensor,
    classes: Sequence[int] | None = None,
    layout: Any = None,
    calibration: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Test accuracy ``[B]`` of every network of ``ws`` loaded into ``build_module(arch)``.

    Args:
        ws: ``B`` networks of the arch's spec (or of a flat layout's pseudo spec).
        arch: arch dict of the target architecture.
        x, y: test inputs (shaped for the arch) and labels.
        classes: evaluate only on test images of these classes (prediction still over all
            outputs); ``None``: all images.
        layout: the generator's :class:`~metanet.generate.data.FlatLayout` (``None``: ``ws`` is
            a weight space); see :func:`load_network`.
        calibration: recalibrate BatchNorm running statistics on these input batches after
            loading each network (:func:`calibration_batches`; ``None``: the loaded buffers).
    """
    from metanet.zoo.architectures import build_module

    if classes is not None:
        keep = torch.isin(y, torch.as_tensor(list(classes), dtype=y.dtype))
        x, y = x[keep], y[keep]
    module = build_module(dict(arch)).eval()
    accs = torch.empty(len(ws))
    for i in range(len(ws)):
        load_network(module, ws, i, layout, calibration)
        out = module(x)
        accs[i] = (out.argmax(1) == y).float().mean() if torch.isfinite(out).all() else 0.0
    return accs
