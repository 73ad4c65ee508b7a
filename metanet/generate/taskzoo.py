"""A multi-task digits-MLP zoo for conditional generation: each network learns one class subset.

Conditional generators (D2NWG) need a zoo whose networks solve *different* tasks. Here a task is a
subset of the ten digit classes (e.g. ``"0-4"`` and ``"5-9"``): a network of task ``t`` is trained
only on the training images of ``t``'s classes (the architecture keeps all ten outputs), and its
``test_acc`` is measured on ``t``'s test images. The task name is stored as the hyperparameter
``task`` of every record and the class lists as the root attribute ``tasks`` (JSON), so
:class:`metanet.generate.data.GeneratorDataModule` (``condition="task"``) and ``metanet generate``
can evaluate each generated network on its own task and on the others.

:func:`build_task_zoo` is a recipe with ``tasks:`` (:mod:`metanet.zoo.recipe`) built by the zoo
builder: the same engines, schedule, optimizers and random draws as every other zoo (full-batch
Adam with a log-uniform learning rate per network). Any recipe can have ``tasks:``, on any data.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["DEFAULT_TASKS", "build_task_zoo", "task_masks", "task_recipe"]

DEFAULT_TASKS: dict[str, list[int]] = {"0-4": [0, 1, 2, 3, 4], "5-9": [5, 6, 7, 8, 9]}
DEFAULT_ARCH = {"type": "mlp", "in": 64, "widths": [32, 16], "out": 10, "activation": "relu"}


def task_masks(labels: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """``[N]`` bool: which ``labels`` belong to ``classes``."""
    return torch.isin(labels, torch.as_tensor(list(classes), dtype=labels.dtype))


def task_recipe(
    arch: Mapping[str, Any] | None = None,
    tasks: Mapping[str, Sequence[int]] | None = None,
    per_task: int = 32,
    steps: int = 300,
    lr: tuple[float, float] = (3e-3, 2e-2),
    seed: int = 0,
    name: str = "digits-mlp-tasks",
) -> dict[str, Any]:
    """The zoo recipe (a plain mapping) of :func:`build_task_zoo`."""
    tasks = {str(k): [int(c) for c in v] for k, v in (tasks or DEFAULT_TASKS).items()}
    if per_task < 1 or steps < 1:
        raise ValueError("per_task and steps must be >= 1")
    return {
        "name": name,
        "seed": seed,
        "architectures": [dict(arch or DEFAULT_ARCH)],
        "networks_per_arch": per_task * len(tasks),
        "tasks": tasks,
        "hparams": {"lr": {"log_uniform": [float(lr[0]), float(lr[1])]}, "optimizer": "adam",
                    "epochs": int(steps), "batch_size": 1_000_000},  # fmt: skip
    }


def build_task_zoo(
    path: str | os.PathLike,
    arch: Mapping[str, Any] | None = None,
    tasks: Mapping[str, Sequence[int]] | None = None,
    per_task: int = 32,
    steps: int = 300,
    lr: tuple[float, float] = (3e-3, 2e-2),
    seed: int = 0,
    name: str = "digits-mlp-tasks",
) -> str:
    """Train ``per_task`` MLPs for every task and write them as a metanet zoo file.

    Args:
        path: output HDF5 file (written atomically; an existing zoo of another recipe is
            replaced).
        arch: an ``{"type": "mlp", ...}`` arch dict (default ``64-[32,16]-10``, ReLU).
        tasks: task name -> digit classes (default :data:`DEFAULT_TASKS`).
        per_task: networks per task.
        steps: full-batch Adam steps per network.
        lr: log-uniform range of the per-network learning rate.
        seed: seeds initializations and learning rates.
        name: the zoo's ``name`` attribute.

    Returns:
        ``path`` as a string.

    Raises:
        metanet.zoo.recipe.RecipeError: tasks or arch that do not fit the digits.
    """
    from metanet.zoo.build import build_zoo
    from metanet.zoo.recipe import Recipe

    recipe = Recipe.from_dict(task_recipe(arch, tasks, per_task, steps, lr, seed, name),
                              source="build_task_zoo")  # fmt: skip
    return os.fspath(build_zoo(recipe, path, progress=False, overwrite=True))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m metanet.generate.taskzoo [OUT.h5]``: build the default two-task zoo."""
    import argparse

    p = argparse.ArgumentParser(description="build a digits class-subset MLP zoo")
    p.add_argument("output", nargs="?", default=".cache/zoos/digits-mlp-tasks.h5")
    p.add_argument("--per-task", type=int, default=24)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(build_task_zoo(args.output, per_task=args.per_task, steps=args.steps, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
