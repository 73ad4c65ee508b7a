"""The zoo builder's optimizers: one implementation of SGD and AdamW for every training engine.

Every engine trains ``M`` networks at once with per-network hyperparameters, so the optimizer works
on *rows*: parameter tensors ``[M, ...]`` whose row ``r`` belongs to one network. The same
:class:`RowOptimizer` serves both layouts the engines use:

* per-parameter tensors ``{key: [M, *shape]}`` (or a list of them): the ``torch.func`` reference
  engine (:mod:`metanet.zoo.train`);
* one flat buffer ``[M, D]`` (every network's parameters in one row): the hand-batched engine
  (:mod:`metanet.zoo.batched`) and the C kernels it drives.

The update is elementwise, so both layouts give the same numbers (tested). Rows ``[:k]`` run SGD
with momentum and coupled weight decay (``torch.optim.SGD``), rows ``[k:]`` AdamW
(``torch.optim.AdamW``); an engine lays its networks out SGD-first (:func:`optimizer_order`, or the
batched engine's lanes, pool 0 first). A row is a *lane* (:func:`metanet.zoo.schedule.plan_lanes`):
it may train several networks one after another, each from fresh optimizer state
(:meth:`RowOptimizer.reset`), so rows of one batch have different step counts. Rows whose network
stopped (diverged, reached its early-stop target) are held with ``frozen``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeAlias

import torch

from metanet.zoo.recipe import NetworkPlan

# what :class:`RowOptimizer` takes as parameters / gradients: one flat ``[M, D]`` tensor, a list of
# ``[M, ...]`` tensors or a ``{key: [M, ...]}`` dict (updated in its iteration order)
Rows: TypeAlias = "torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]"

DEFAULTS = {"optimizer": "adam", "lr": 0.01, "weight_decay": 0.0, "momentum": 0.9}


def uses_adam(plans: Sequence[NetworkPlan]) -> list[bool]:
    """Whether each plan's network trains with AdamW (``optimizer: adam``, the default) rather
    than SGD."""
    return [p.hparams.get("optimizer", DEFAULTS["optimizer"]) == "adam" for p in plans]


def optimizer_hparams(plans: Sequence[NetworkPlan], device: torch.device | str = "cpu"
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Learning rate, weight decay and momentum ``[N]`` (float32) of every plan, with the zoo's
    defaults where a recipe leaves them unset."""
    cols = [[float(p.hparams.get(k, DEFAULTS[k])) for p in plans]
            for k in ("lr", "weight_decay", "momentum")]  # fmt: skip
    lr, wd, mom = (torch.tensor(c, dtype=torch.float32, device=device) for c in cols)
    return lr, wd, mom


def optimizer_order(is_adam: Sequence[bool]) -> list[int]:
    """Network indices SGD first, AdamW after (each group in its given order): the row layout
    :class:`RowOptimizer` expects, with ``k_sgd = is_adam.count(False)``."""
    return [i for i, a in enumerate(is_adam) if not a] + [i for i, a in enumerate(is_adam) if a]


def _tensors(x: Rows) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, Mapping):
        return list(x.values())
    return list(x)


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-row values ``[R, 1]`` shaped to broadcast over ``like`` ``[R, ...]`` (no view for
    the flat layout's 2-D rows: this runs every step)."""
    return v if like.dim() == 2 else v.view(-1, *([1] * (like.dim() - 1)))


class RowOptimizer:
    """SGD with momentum and coupled weight decay (as ``torch.optim.SGD``) on rows ``[:k_sgd]``
    and AdamW (as ``torch.optim.AdamW``) on the other rows of parameter tensors ``[M, ...]``
    (a flat ``[M, D]`` buffer, or per-parameter tensors: see :data:`Rows`), with per-row learning
    rate, weight decay and momentum ``[M]`` and per-row step counts. Updates are in place.

    Args:
        params: the parameters (their shapes and layout; values are not read).
        lr, weight_decay, momentum: per-row hyperparameters ``[M]`` (momentum is read on SGD
            rows only).
        k_sgd: the number of SGD rows (the first ones).
        betas, eps: AdamW's, shared by all rows.
    """

    def __init__(
        self,
        params: Rows,
        lr: torch.Tensor,
        weight_decay: torch.Tensor,
        momentum: torch.Tensor,
        k_sgd: int,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        ps = _tensors(params)
        rows = ps[0].shape[0]
        if not 0 <= k_sgd <= rows or any(p.shape[0] != rows for p in ps):
            raise ValueError(f"k_sgd={k_sgd} SGD rows for parameters of {rows} rows "
                             f"({[tuple(p.shape) for p in ps]})")  # fmt: skip
        # per-row columns [M, 1]
        self.lr, self.wd, self.mom = (v.reshape(-1, 1).clone() for v in (lr, weight_decay,
                                                                         momentum))  # fmt: skip
        self.k = k_sgd
        self.b1, self.b2 = betas
        self.eps = eps
        self.buf = [torch.zeros_like(p[:k_sgd]) for p in ps]
        self.m = [torch.zeros_like(p[k_sgd:]) for p in ps]
        self.v = [torch.zeros_like(p[k_sgd:]) for p in ps]
        self.t = torch.zeros(rows - k_sgd, 1, dtype=torch.float64, device=ps[0].device)

    @property
    def rows(self) -> int:
        """The number of rows ``M``."""
        return self.lr.shape[0]

    @property
    def steps(self) -> torch.Tensor:
        """Updates made by each AdamW row since its network started ``[M - k_sgd]``."""
        return self.t[:, 0]

    def select(self, keep: torch.Tensor) -> None:
        """Keep the rows where ``keep`` ``[M]`` (bool) is true, in order (finished networks or
        lanes leave the batch; the SGD rows stay first)."""
        ks, ka = keep[: self.k], keep[self.k :]
        self.lr, self.wd, self.mom = self.lr[keep], self.wd[keep], self.mom[keep]
        self.buf = [b[ks] for b in self.buf]
        self.m, self.v = [m[ka] for m in self.m], [v[ka] for v in self.v]
        self.t = self.t[ka]
        self.k = int(ks.sum())

    def reset(self, rows: torch.Tensor, lr: torch.Tensor, weight_decay: torch.Tensor,
              momentum: torch.Tensor) -> None:  # fmt: skip
        """Fresh state and hyperparameters ``[R]`` for the networks that start in ``rows`` ``[R]``
        (long; a lane's next network keeps its lane's rule: SGD rows stay SGD)."""
        self.lr[rows, 0], self.wd[rows, 0], self.mom[rows, 0] = lr, weight_decay, momentum
        s, a = rows[rows < self.k], rows[rows >= self.k] - self.k
        for b in self.buf:
            b[s] = 0.0
        for m, v in zip(self.m, self.v):
            m[a], v[a] = 0.0, 0.0
        self.t[a] = 0.0

    def step(self, params: Rows, grads: Rows, frozen: torch.Tensor | None = None) -> None:
        """One update of ``params`` in place from ``grads`` (same layout; SGD rows' gradients are
        overwritten). Rows where ``frozen`` ``[M]`` (bool) is true keep their parameters (their
        gradients are zeroed first, so non-finite ones do no harm; their optimizer state is never
        used again: a frozen network stays frozen until its row is :meth:`reset`). Parameters
        must not require grad (the engines' never do)."""
        ps, gs = _tensors(params), _tensors(grads)
        held = None
        if frozen is not None and bool(frozen.any()):
            held = [p[frozen].clone() for p in ps]
            for g in gs:
                g[frozen] = 0.0
        k, rows = self.k, ps[0].shape[0]
        if k:
            lr, wd, mom = self.lr[:k], self.wd[:k], self.mom[:k]
            for p, g, buf in zip(ps, gs, self.buf):
                p, g = p[:k], g[:k]
                g.add_(p * _col(wd, p))
                buf.mul_(_col(mom, p)).add_(g)
                p.sub_(buf * _col(lr, p))
        if k < rows:
            lr, wd = self.lr[k:], self.wd[k:]
            self.t += 1
            c1 = (1.0 - self.b1**self.t).float()
            c2 = (1.0 - self.b2**self.t).sqrt().float()
            decay, size = 1.0 - lr * wd, lr / c1
            for p, g, m, v in zip(ps, gs, self.m, self.v):
                p, g = p[k:], g[k:]
                p.mul_(_col(decay, p))
                m.lerp_(g, 1.0 - self.b1)
                v.mul_(self.b2).addcmul_(g, g, value=1.0 - self.b2)
                denom = (v.sqrt() / _col(c2, p)).add_(self.eps)
                p.sub_(m / denom * _col(size, p))
        if held is not None:
            for p, h in zip(ps, held):
                p[frozen] = h
