"""A multi-task digits-MLP zoo for conditional generation: each network learns one class subset.

Conditional generators (D2NWG) need a zoo whose networks solve *different* tasks. Here a task is a
subset of the ten digit classes (e.g. ``"0-4"`` and ``"5-9"``): a network of task ``t`` is trained
only on the training images of ``t``'s classes (the architecture keeps all ten outputs), and its
``test_acc`` is measured on ``t``'s test images. The task name is stored as the hyperparameter
``task`` of every record and the class lists as the root attribute ``tasks`` (JSON), so
:class:`metanet.generate.data.GeneratorDataModule` (``condition="task"``) and ``metanet generate``
can evaluate each generated network on its own task and on the others.

Networks are trained together: parameters are stacked ``[N, ...]`` and every step runs all of them
in one batched matmul (full-batch Adam; Adam is elementwise, so the runs stay independent).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from metanet.data.digits import DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION, load_digits

__all__ = ["DEFAULT_TASKS", "build_task_zoo", "task_masks"]

DEFAULT_TASKS: dict[str, list[int]] = {"0-4": [0, 1, 2, 3, 4], "5-9": [5, 6, 7, 8, 9]}


def task_masks(labels: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """``[N]`` bool: which ``labels`` belong to ``classes``."""
    return torch.isin(labels, torch.as_tensor(list(classes), dtype=labels.dtype))


def _mlp_layers(arch: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """``(module name, out, in)`` of the Linear layers of ``build_module(arch)`` (an MLP)."""
    from metanet.zoo.architectures import build_module

    module = build_module(arch)
    layers = [
        (name, sub.out_features, sub.in_features)
        for name, sub in module.named_modules()
        if isinstance(sub, torch.nn.Linear)
    ]
    if not layers:
        raise ValueError(f"arch {dict(arch)} has no Linear layers")
    return layers


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
        path: output HDF5 file (written atomically).
        arch: an ``{"type": "mlp", ...}`` arch dict with ReLU (default ``64-[32,16]-10``).
        tasks: task name -> digit classes (default :data:`DEFAULT_TASKS`).
        per_task: networks per task.
        steps: full-batch Adam steps per network.
        lr: log-uniform range of the per-network learning rate.
        seed: seeds initializations and learning rates.
        name: the zoo's ``name`` attribute.

    Returns:
        ``path`` as a string.
    """
    from metanet.data.zoo_store import ZooWriter
    from metanet.zoo.architectures import build_module

    arch = dict(
        arch or {"type": "mlp", "in": 64, "widths": [32, 16], "out": 10, "activation": "relu"}
    )
    if arch.get("type") != "mlp" or arch.get("activation", "relu") != "relu":
        raise ValueError(f"build_task_zoo trains ReLU MLPs only, got {arch}")
    tasks = {str(k): [int(c) for c in v] for k, v in (tasks or DEFAULT_TASKS).items()}
    if not tasks or any(not v or min(v) < 0 or max(v) > 9 for v in tasks.values()):
        raise ValueError(f"tasks must map names to non-empty lists of digits 0..9, got {tasks}")
    if per_task < 1 or steps < 1:
        raise ValueError("per_task and steps must be >= 1")
    data = load_digits()
    x_tr, x_te = data.flat()
    layers = _mlp_layers(arch)
    names = list(tasks)
    n = per_task * len(names)
    task_of = np.repeat(np.arange(len(names)), per_task)
    gen = torch.Generator().manual_seed(seed)
    # stacked parameters from the architecture's own initialization, one seed per network
    params: dict[str, torch.Tensor] = {}
    modules = []
    for i in range(n):
        torch.manual_seed(seed * 100003 + i)
        modules.append(build_module(arch))
    keys = list(modules[0].state_dict())
    for key in keys:
        params[key] = torch.stack([m.state_dict()[key] for m in modules]).requires_grad_(True)
    log_lo, log_hi = math.log(lr[0]), math.log(lr[1])
    lrs = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, generator=gen))

    # per-network training masks (own task) over the full train split
    train_mask = torch.stack([task_masks(data.y_train, tasks[names[t]]) for t in task_of]).float()
    test_masks = {t: task_masks(data.y_test, c) for t, c in tasks.items()}

    def forward(x: torch.Tensor) -> torch.Tensor:  # x [S, 64] -> logits [N, S, out]
        h = x.expand(n, *x.shape)
        for j, (lname, _, _) in enumerate(layers):
            h = torch.baddbmm(
                params[f"{lname}.bias"][:, None, :], h, params[f"{lname}.weight"].transpose(1, 2)
            )
            if j < len(layers) - 1:
                h = torch.relu(h)
        return h

    flat_params = [params[k] for k in keys]
    # Adam with lr=1, then each network's step is scaled by its own lr: Adam's update is
    # lr * m_hat / (sqrt(v_hat) + eps), so this is exactly per-network-lr Adam.
    opt = torch.optim.Adam(flat_params, lr=1.0)
    for _ in range(steps):
        before = [p.detach().clone() for p in flat_params]
        logits = forward(x_tr)  # [N, S, 10]
        ce = F.cross_entropy(logits.transpose(1, 2), data.y_train.expand(n, -1), reduction="none")
        loss = ((ce * train_mask).sum(1) / train_mask.sum(1)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():  # Adam step of size 1 scaled to each network's own lr
            for p, b in zip(flat_params, before):
                p.copy_(b + (p - b) * lrs.view(-1, *([1] * (p.dim() - 1))))

    with torch.no_grad():
        out_tr, out_te = forward(x_tr), forward(x_te)
        metrics: dict[str, list[float]] = {
            k: [] for k in ("train_acc", "test_acc", "train_loss", "test_loss", "acc_all")
        }
        for i in range(n):
            t = names[task_of[i]]
            mtr = train_mask[i].bool()
            mte = test_masks[t]
            metrics["train_acc"].append(
                float((out_tr[i, mtr].argmax(1) == data.y_train[mtr]).float().mean())
            )
            metrics["test_acc"].append(
                float((out_te[i, mte].argmax(1) == data.y_test[mte]).float().mean())
            )
            metrics["train_loss"].append(float(F.cross_entropy(out_tr[i, mtr], data.y_train[mtr])))
            metrics["test_loss"].append(float(F.cross_entropy(out_te[i, mte], data.y_test[mte])))
            metrics["acc_all"].append(float((out_te[i].argmax(1) == data.y_test).float().mean()))
    metrics_np = {k: np.asarray(v) for k, v in metrics.items()}
    metrics_np["epoch"] = np.full(n, steps)
    metrics_np["run_id"] = np.arange(n)
    metrics_np["seed"] = seed * 100003 + np.arange(n)
    attrs = {
        "name": name,
        "kind": "classifier",
        "data": {"split_seed": DIGITS_SPLIT_SEED, "test_fraction": DIGITS_TEST_FRACTION},
        "tasks": tasks,
    }
    with ZooWriter(path, attrs=attrs) as writer:
        writer.add(
            arch,
            params={k: v.detach() for k, v in params.items()},
            metrics=metrics_np,
            hparams={"task": np.array([names[t] for t in task_of]), "lr": lrs.numpy()},
        )
    return os.fspath(path)


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
