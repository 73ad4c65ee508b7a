"""A tiny, real model zoo for tests: a few digits MLPs and CNNs trained for a handful of steps.

Runs differ in seed and learning rate and keep checkpoints after 1, 4, 10 and 24 full-batch steps
(records of one run share a ``run_id``), so test accuracies spread from chance to ~90 %.
The zoo is written with :class:`metanet.data.zoo_store.ZooWriter` and built once per test session
(memoized by path).
"""

from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from metanet.data.digits import load_digits
from metanet.zoo.architectures import arch_name, build_module

MLP = {"type": "mlp", "in": 64, "widths": [16, 12], "out": 10, "activation": "relu"}
CNN = {"type": "cnn", "channels": [4, 6], "kernel": 3, "activation": "relu", "head": "pool"}
CNN_FLAT = {"type": "cnn", "channels": [3, 4], "kernel": 3, "strides": [2, 2], "head": "flatten"}
SIREN = {"type": "siren", "widths": [8, 8], "w0": 30.0}

KEEP_STEPS = (1, 4, 10, 24)
_BUILT: dict[str, str] = {}


def _train_run(
    arch: dict, seed: int, lr: float, keep: tuple[int, ...], data
) -> list[tuple[dict, dict]]:
    """Train one network full-batch with Adam on 400 training images; return
    (state_dict, metrics) after each step count in ``keep``."""
    torch.manual_seed(seed)
    net = build_module(arch)
    flat = arch["type"] == "mlp"
    x_tr = (data.x_train.flatten(1) if flat else data.x_train)[:400]
    y_tr = data.y_train[:400]
    x_te = data.x_test.flatten(1) if flat else data.x_test
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    records = []
    for step in range(1, max(keep) + 1):
        opt.zero_grad()
        loss = F.cross_entropy(net(x_tr), y_tr)
        loss.backward()
        opt.step()
        if step in keep:
            with torch.no_grad():
                out_tr, out_te = net(x_tr), net(x_te)
                metrics = {
                    "train_loss": float(F.cross_entropy(out_tr, y_tr)),
                    "test_loss": float(F.cross_entropy(out_te, data.y_test)),
                    "train_acc": float((out_tr.argmax(1) == y_tr).float().mean()),
                    "test_acc": float((out_te.argmax(1) == data.y_test).float().mean()),
                    "epoch": step,
                }
            records.append(({k: v.clone() for k, v in net.state_dict().items()}, metrics))
    return records


def build_tiny_zoo(path: str, archs: tuple[dict, ...] = (MLP, CNN_FLAT), runs: int = 6) -> str:
    """Write a zoo of ``runs`` training runs (one checkpoint per :data:`KEEP_STEPS`) per arch."""
    if path in _BUILT and os.path.exists(path):
        return path
    with one_thread():
        _build(path, archs, runs)
    _BUILT[path] = path
    return path


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread: on a busy 2-core machine OpenMP spinning makes tiny ops ~40x
    slower with 2 threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _build(path: str, archs: tuple[dict, ...], runs: int) -> None:
    from metanet.data.zoo_store import ZooWriter

    data = load_digits()
    rng = np.random.default_rng(0)
    with ZooWriter(path, attrs={"name": "tiny-test-zoo"}) as writer:
        for a, arch in enumerate(archs):
            params: dict[str, list[torch.Tensor]] = {}
            metrics: dict[str, list[float]] = {}
            for run in range(runs):
                lr = float(math.exp(rng.uniform(math.log(3e-3), math.log(8e-2))))
                seed = 1000 * a + run
                for sd, m in _train_run(arch, seed, lr, KEEP_STEPS, data):
                    for k, v in sd.items():
                        params.setdefault(k, []).append(v)
                    for k, v in {**m, "run_id": run, "seed": seed, "lr": lr}.items():
                        metrics.setdefault(k, []).append(v)
            lrs = metrics.pop("lr")
            writer.add(
                arch,
                {k: torch.stack(v) for k, v in params.items()},
                {k: np.asarray(v) for k, v in metrics.items()},
                hparams={"lr": np.asarray(lrs)},
            )


def group_name(arch: dict) -> str:
    return arch_name(arch)


def build_tiny_inr_zoo(path: str, per_class: int = 3, steps: int = 40) -> str:
    """A digits-SIREN zoo: one small SIREN fitted to each of ``per_class`` test images per digit
    (all networks fitted together as one batched model); metric ``label`` is the digit."""
    from metanet.data.digits import digit_image_coordinates
    from metanet.data.zoo_store import ZooWriter
    from metanet.weightspace import WeightSpace

    if path in _BUILT and os.path.exists(path):
        return path
    with one_thread():
        data = load_digits()
        idx = torch.cat([torch.nonzero(data.y_test == c)[:per_class, 0] for c in range(10)])
        images = data.x_test[idx].flatten(1)  # [n, 64]
        labels = data.y_test[idx]
        n = len(idx)
        coords = digit_image_coordinates(8)  # [64, 2]
        torch.manual_seed(0)
        nets = [build_module(SIREN) for _ in range(n)]
        ws = WeightSpace.from_modules(nets)
        params = [t.clone().requires_grad_(True) for t in ws.weights + ws.biases]
        opt = torch.optim.Adam(params, lr=1e-3)
        layers = len(ws.weights)

        def forward(ps):
            h = coords.expand(n, -1, -1)  # [n, 64, 2]
            for i in range(layers):
                h = torch.einsum("npi,noi->npo", h, ps[i]) + ps[layers + i][:, None]
                if i < layers - 1:
                    h = torch.sin(SIREN["w0"] * h)
            return h[..., 0]  # [n, 64]

        for _ in range(steps):
            opt.zero_grad()
            loss = ((forward(params) - images) ** 2).mean()
            loss.backward()
            opt.step()
        with torch.no_grad():
            mse = ((forward(params) - images) ** 2).mean(1)
        fitted = WeightSpace(ws.spec, [p.detach() for p in params[:layers]],
                             [p.detach() for p in params[layers:]])  # fmt: skip
        zero = np.zeros(n)
        with ZooWriter(path, attrs={"name": "tiny-test-siren", "kind": "siren"}) as writer:
            writer.add(
                SIREN,
                {k: v for k, v in fitted.stacked_params().items()},
                {"test_acc": zero, "train_acc": zero, "test_loss": mse.numpy(),
                 "train_loss": mse.numpy(), "epoch": np.full(n, steps), "run_id": np.arange(n),
                 "seed": np.arange(n), "label": labels.numpy()},
            )  # fmt: skip
    _BUILT[path] = path
    return path
