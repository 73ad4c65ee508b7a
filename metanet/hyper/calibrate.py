"""Recalibrate BatchNorm running statistics of a module whose parameters were just predicted.

A graph hypernetwork predicts parameters, not buffers: after :meth:`metanet.hyper.ghn.GHN.apply`
(or ``metanet init-weights``) a BatchNorm layer still holds the running mean / variance of the
module's own initialisation (zeros and ones), which do not match the activations the predicted
weights produce, so the network is wrong in ``eval()`` mode. GHN-2/GHN-3 (Knyazev et al.) and
LoGAH recompute them on a few training batches; so does :func:`calibrate_batchnorm`::

    ghn.load_into(model)
    report = calibrate_batchnorm(model, task_batches(task, num_batches=8))
    report.summary()   # 'calibrated 4 BatchNorm layers on 8 batches (512 samples)'

Every BatchNorm layer (``nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm``, lazy variants) that tracks
running statistics has them reset and recomputed as the *exact average* over the given batches
(``momentum=None`` while calibrating, i.e. PyTorch's cumulative moving average: the running mean
is the mean of the per-batch means, the running variance the mean of the per-batch unbiased
variances); its momentum is restored afterwards. Nothing else changes: parameters are untouched
(the forwards run under ``no_grad``), the other modules run in ``eval()`` mode (dropout off) and
every module's training flag is restored. A module without BatchNorm is a no-op (the report says
so).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CalibrationError", "CalibrationReport", "batchnorm_layers", "calibrate_batchnorm",
           "task_batches"]  # fmt: skip


class CalibrationError(ValueError):
    """Calibration that cannot run: no batches, or a batch the module cannot take (the message
    names the batch and the module)."""


@dataclass
class CalibrationReport:
    """What :func:`calibrate_batchnorm` did.

    Attributes:
        layers: module paths of the BatchNorm layers whose running statistics were recomputed
            (empty: the module has none, nothing changed).
        batches: batches run through the module (0 when there was nothing to calibrate).
        samples: samples in those batches.
    """

    layers: list[str] = field(default_factory=list)
    batches: int = 0
    samples: int = 0

    @property
    def calibrated(self) -> bool:
        """Whether any running statistics changed."""
        return bool(self.layers)

    def summary(self) -> str:
        """One line for logs and the CLI."""
        if not self.layers:
            return "no BatchNorm layer tracks running statistics: nothing to calibrate"
        return (f"calibrated {len(self.layers)} BatchNorm layers on {self.batches} batches "
                f"({self.samples} samples)")  # fmt: skip


def batchnorm_layers(module: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """``(path, layer)`` of every BatchNorm layer of ``module`` that tracks running statistics."""
    return [(name, m) for name, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None]  # fmt: skip


def _inputs(batch: Any) -> Any:
    """The input part of a batch: a tensor, the first item of ``(x, y)``, or ``batch['x']``."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict):
        for key in ("x", "input", "inputs", "pixel_values", "input_ids"):
            if key in batch:
                return batch[key]
        raise CalibrationError("a calibration batch is a dict without an input key (x, "
                               f"input, inputs, pixel_values, input_ids): {sorted(batch)}")
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise CalibrationError(f"a calibration batch must be a tensor, (inputs, targets) or a dict, "
                           f"got {type(batch).__name__}")  # fmt: skip


@torch.no_grad()
def calibrate_batchnorm(module: nn.Module, batches: Iterable[Any],
                        num_batches: int | None = None) -> CalibrationReport:  # fmt: skip
    """Reset and recompute the BatchNorm running statistics of ``module`` on ``batches``.

    Args:
        module: the network (in place); its parameters and non-BatchNorm state are not changed.
        batches: an iterable of input batches: tensors, ``(inputs, targets)`` pairs (a
            ``DataLoader``) or dicts with an ``x`` key; inputs are moved to the module's device.
        num_batches: use at most this many batches (default: all of ``batches``).
    Returns:
        The :class:`CalibrationReport` (no layers and 0 batches when ``module`` has no
        BatchNorm layer: then ``batches`` is not read at all).
    Raises:
        CalibrationError: ``num_batches < 1``, no batch given, or the module fails on a batch
            (its statistics are then restored to what they were).
    """
    if num_batches is not None and num_batches < 1:
        raise CalibrationError(f"num_batches must be >= 1, got {num_batches}")
    layers = batchnorm_layers(module)
    if not layers:
        return CalibrationReport()
    first = next(iter(module.parameters()), None)
    device = first.device if first is not None else None
    flags = {name: m.training for name, m in module.named_modules()}
    saved = {name: (m.momentum, m.running_mean.clone(), m.running_var.clone(),
                    None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for name, m in layers}  # fmt: skip
    done, samples = 0, 0
    ok = False
    try:
        module.eval()
        for _, m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
            m.train()
        for batch in batches:
            if num_batches is not None and done >= num_batches:
                break
            x = _inputs(batch)
            if isinstance(x, Tensor) and device is not None:
                x = x.to(device)
            try:
                module(x)
            except Exception as exc:  # noqa: BLE001 - the user's forward can raise anything
                shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
                where = type(module).__name__
                raise CalibrationError(f"calibration batch {done} (inputs {shape}) does not "
                                       f"run through {where}: {exc}") from exc
            done += 1
            samples += int(x.shape[0]) if isinstance(x, Tensor) and x.dim() else 1
        if done == 0:
            raise CalibrationError("no calibration batch was given")
        ok = True
    finally:
        for name, m in layers:
            momentum, mean, var, count = saved[name]
            m.momentum = momentum
            if not ok:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                if count is not None:
                    m.num_batches_tracked.copy_(count)
        for name, m in module.named_modules():
            m.training = flags[name]
    return CalibrationReport([name for name, _ in layers], done, samples)


def task_batches(task: Any, num_batches: int, batch_size: int = 64, seed: int = 0,
                 input_shape: tuple[int, ...] | None = None,
                 split: str = "train") -> Iterator[Tensor]:  # fmt: skip
    """``num_batches`` input batches ``[batch_size, *shape]`` of a split of the task data
    (:class:`metanet.data.tasks.TaskData` from any provider), drawn without replacement in a
    seeded order (the split is cycled when it has fewer samples than asked for).

    Args:
        task: the task data.
        num_batches: batches to yield.
        batch_size: samples per batch.
        seed: order of the samples.
        input_shape: reshape each sample to this (e.g. flat ``(64,)`` for an MLP); default the
            data's own input shape.
        split: ``train`` (default), ``val`` or ``test``.
    """
    if num_batches < 1 or batch_size < 1:
        raise CalibrationError(f"num_batches and batch_size must be >= 1, got {num_batches} "
                               f"and {batch_size}")  # fmt: skip
    data = task.split(split)
    n = data.num_samples
    if n == 0:
        raise CalibrationError(f"the {split} split of {task.name} is empty")
    g = torch.Generator().manual_seed(seed)
    need = num_batches * batch_size
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(need / n))])
    for b in range(num_batches):
        x, _ = data.batch(order[b * batch_size : (b + 1) * batch_size])
        x = torch.as_tensor(x)
        yield x.reshape(x.shape[0], *input_shape) if input_shape is not None else x
