"""Train many networks of one architecture at once with ``torch.func`` (vmap over stacked params).

All ``N`` networks of a chunk share one module *structure*; their parameters are stacked
(``{key: [N, *shape]}``) and one step is ``vmap(grad(loss))`` over ``functional_call``. Everything
that differs between networks is a batched tensor:

* learning rate, weight decay, momentum, optimizer (SGD with momentum / AdamW) — the update is
  written functionally on the stacked tensors, both rules are computed and ``torch.where`` picks
  each network's rule (:class:`FunctionalOptimizer`);
* dropout rate — a per-network buffer of :class:`~metanet.zoo.architectures.SampledDropout`, masks
  drawn with ``vmap(randomness="different")``;
* train fraction and label noise — per-network label tables ``[N, n_train]`` and subset masks;
* batch size — every network draws its own batch from its own shuffled subset; the batch tensor
  is ``[N, B_max, ...]`` and a per-sample weight ``[N, B_max]`` (``1/b_n`` on the ``b_n`` real
  samples, 0 on padding) makes the loss each network's own mean over its own batch;
* epochs — network ``n`` runs ``epochs_n * ceil(n_sub / b_n)`` steps; once done (or once its
  loss/gradient is not finite: "diverged") its parameters and optimizer state stop changing.

Chunks are built so networks of similar batch size and step count train together (little padding).
Checkpoints are snapshots of each network at its kept epochs, evaluated after training in one vmap.

This ``torch.func`` engine trains any architecture (norm layers, residual blocks). For plain
chains (MLPs, CNNs without norm/residual, SIRENs) :func:`train_chunk` uses the several times faster
hand-batched engine of :mod:`metanet.zoo.batched` by default (``engine="auto"``); both give the
same networks up to float rounding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from metanet.zoo.architectures import ACTIVATIONS, SampledDropout, build_module, normalize_arch
from metanet.zoo.recipe import NetworkPlan

if TYPE_CHECKING:
    from metanet.data.tasks import TaskData

ENGINES = ("auto", "batched", "vmap")


def resolve_engine(arch: dict[str, Any], engine: str = "auto", regression: bool = False,
                   device: torch.device | str = "cpu") -> str:  # fmt: skip
    """The engine that really trains ``arch`` when ``engine`` is asked for: ``"native"`` (the
    batched engine running the fused C kernels), ``"batched"`` or ``"vmap"``. It is part of a
    zoo's fingerprint, so a resumed or sharded build never mixes engines (their results agree
    only up to float rounding).

    Raises:
        ValueError: an unknown engine, or ``"batched"`` for an arch it does not train.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
    if engine == "vmap":
        return "vmap"
    from metanet.zoo import batched

    if not batched.supports(arch):
        if engine == "batched":
            raise ValueError(f"the batched engine does not train {arch} (use engine='vmap')")
        return "vmap"
    native = batched.native_chain(batched.BatchedNet(arch), torch.device(device), regression)
    return "batched" if native is None else "native"


@dataclass
class ChunkResult:
    """Records of a trained chunk: ``params`` ``{key: [R, ...]}``, metrics/hparams ``[R]``."""

    params: dict[str, torch.Tensor]
    metrics: dict[str, np.ndarray]
    hparams: dict[str, np.ndarray]


# ------------------------------------------------------------------------------------------------
# initialization
# ------------------------------------------------------------------------------------------------
_INIT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


@torch.no_grad()
def _apply_scheme(layers: Sequence[nn.Module], scheme: str, scale: float) -> None:
    """Re-initialize the weights of ``layers`` with ``scheme`` (biases zeroed; ``"default"``
    keeps them as constructed) and multiply them by ``scale``."""
    for layer in layers:
        w = layer.weight
        if scheme != "default":
            if scheme == "kaiming_uniform":
                nn.init.kaiming_uniform_(w, nonlinearity="relu")
            elif scheme == "kaiming_normal":
                nn.init.kaiming_normal_(w, nonlinearity="relu")
            elif scheme == "xavier_uniform":
                nn.init.xavier_uniform_(w)
            elif scheme == "xavier_normal":
                nn.init.xavier_normal_(w)
            elif scheme == "orthogonal":
                nn.init.orthogonal_(w)
            elif scheme == "normal":
                nn.init.normal_(w, std=0.05)
            else:
                raise ValueError(f"unknown init scheme {scheme!r}")
            if layer.bias is not None:
                layer.bias.zero_()
        w.mul_(scale)


def init_network(arch: dict[str, Any], seed: int, scheme: str = "default", scale: float = 1.0):
    """A module of ``arch`` initialized from ``seed``: ``scheme`` for Linear/Conv weights (biases
    zero unless ``"default"``, which keeps PyTorch's/SIREN's init), weights multiplied by
    ``scale``."""
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only: torch.manual_seed also queues lazy CUDA seeding, which
        # records a stack trace per call (most of the cost of initializing a tiny network)
        torch.default_generator.manual_seed(seed)
        module = build_module(arch)
        _apply_scheme([m for m in module.modules() if isinstance(m, _INIT_LAYERS)], scheme, scale)
    return module


def init_rows(arch: dict[str, Any], plans: Sequence[NetworkPlan]) -> torch.Tensor:
    """The initial parameters of every plan's network as rows ``[N, D]`` (``named_parameters``
    order), equal to :func:`init_network`'s, without building a module per network: one module
    is re-initialized per plan (``reset_parameters`` of each layer in construction order draws
    what the constructors draw). Plain MLP/CNN chains only; other archs go through
    :func:`init_network`."""
    template = build_module(arch)
    layers = [m for m in template.modules() if isinstance(m, _INIT_LAYERS)]
    plain = normalize_arch(arch)["type"] in ("mlp", "cnn") and all(
        isinstance(m, (*_INIT_LAYERS, nn.Sequential, nn.Flatten, nn.AvgPool2d, SampledDropout,
                       *ACTIVATIONS.values()))  # fmt: skip
        for m in template.modules()
    )
    params = list(template.parameters())
    if not plain:
        return torch.stack([torch.cat([q.detach().reshape(-1) for q in m.parameters()])
                            for m in init_networks(arch, plans)])  # fmt: skip
    out = torch.empty(len(plans), sum(q.numel() for q in params))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        for i, plan in enumerate(plans):
            torch.default_generator.manual_seed(plan.weight_seed)
            for layer in layers:
                layer.reset_parameters()
            _apply_scheme(layers, plan.hparams.get("init", "default"),
                          float(plan.hparams.get("init_scale", 1.0)))  # fmt: skip
            torch.cat([q.reshape(-1) for q in params], out=out[i])
    return out


def init_networks(arch: dict[str, Any], plans: Sequence[NetworkPlan]) -> list[nn.Module]:
    """One freshly initialized module per plan (its weight seed, init scheme and scale)."""
    return [
        init_network(
            arch,
            p.weight_seed,
            p.hparams.get("init", "default"),
            float(p.hparams.get("init_scale", 1.0)),
        )  # fmt: skip
        for p in plans
    ]


def hparam_column(
    plans: Sequence[NetworkPlan], key: str, default: Any, dtype=torch.float32, device="cpu"
) -> torch.Tensor:
    """The hyperparameter ``key`` of every plan as a tensor ``[N]`` (``default`` where unset)."""
    return torch.tensor([p.hparams.get(key, default) for p in plans], dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------------
# functional optimizer
# ------------------------------------------------------------------------------------------------


def step_schedule(
    plans: Sequence[NetworkPlan],
    subset_size: torch.Tensor,
    n_train: int,
    keep_fractions: Sequence[float],
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-network step schedule both engines follow: ``(batch, steps_per_epoch, epochs,
    keep)``, each ``[N]`` except ``keep`` ``[N, K]`` (the epoch after which checkpoint slot ``k``
    is taken: ``max(1, round(f_k * epochs))``). ``subset_size`` ``[N]``: training samples of each
    network; a batch size above it (or unset) means full batches."""
    batch = torch.minimum(
        hparam_column(plans, "batch_size", n_train, torch.long, device), subset_size
    )
    steps_per_epoch = (subset_size + batch - 1) // batch
    epochs = hparam_column(plans, "epochs", 1, torch.long, device)
    keep = torch.stack(
        [(epochs.double() * f).round().clamp_min(1).long() for f in keep_fractions], dim=1
    )
    return batch, steps_per_epoch, epochs, keep


def psnr_targets(plans: Sequence[NetworkPlan], device: torch.device | str = "cpu"
                 ) -> tuple[torch.Tensor, bool]:  # fmt: skip
    """The early-stop threshold of each network as a training MSE ``[N]`` (``psnr_target`` dB
    for values in [0, 1]: ``mse <= 10**(-psnr/10)``; no target: -1, never reached) and whether
    any network has one. Both engines stop updating a network at the first step whose
    full-batch loss is within it (the DWS/NFN INR protocol's early stop)."""
    targets = [p.hparams.get("psnr_target") for p in plans]
    mse = [10.0 ** (-float(t) / 10.0) if t else -1.0 for t in targets]
    return torch.tensor(mse, device=device), any(t for t in targets)


def sample_orders(subset: torch.Tensor, epochs: int, generator_seed: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:  # fmt: skip
    """The order in which every network visits its training samples in each epoch,
    ``[N, epochs, n]`` (a permutation of its ``subset`` ``[N, n]`` first, samples outside it
    last): the one random draw of the sample order, made here for every engine so that engines
    differ only in arithmetic."""
    gen = torch.Generator(device="cpu").manual_seed(generator_seed)
    keys = torch.rand(subset.shape[0], epochs, subset.shape[1], generator=gen).to(device)
    keys.masked_fill_(~subset.to(device)[:, None, :], 2.0)
    return keys.argsort(dim=-1)


_M64 = (1 << 64) - 1


def _i64(c: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 tensors (uint64 arithmetic, wrapping): the hash behind
    every dropout mask, bit for bit the ``mix64`` of ``metanet/zoo/_chain.c``."""
    x = x + _i64(0x9E3779B97F4A7C15)
    x = (x ^ _shr(x, 30)) * _i64(0xBF58476D1CE4E5B9)
    x = (x ^ _shr(x, 27)) * _i64(0x94D049BB133111EB)
    return x ^ _shr(x, 31)


def dropout_keys(generator_seed: int, nets: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The dropout key ``[M]`` (int64 bits of a uint64) of network ``nets[m]`` (its index in the
    chunk) at its own training step ``steps[m]``: every engine draws the masks of that step from
    it (:func:`dropout_multipliers`), so engines differ only in arithmetic."""
    seed = torch.tensor(_i64(int(generator_seed) & _M64), dtype=torch.int64)
    return mix64(seed ^ mix64((nets.long() << 32) + steps.long()))


def dropout_multipliers(keys: torch.Tensor, rate: torch.Tensor, op: int, batch: int,
                        units: int) -> torch.Tensor:  # fmt: skip
    """Inverted-dropout multipliers ``[M, batch, units]`` of the dropout op number ``op`` of a
    chain: unit ``i`` (in (C, H, W) order) of batch slot ``b`` of network row ``m`` is kept (times
    ``1 / (1 - q)``) when a 16-bit draw of ``mix64`` keyed by ``keys[m]``, the slot's block of
    eight, ``op`` and ``i`` is at least ``q * 65536`` (``q`` the rate ``rate[m]`` rounded to a
    multiple of 1/65536), else 0 - the same draws as the C kernels."""
    dev = keys.device
    b = torch.arange(batch, device=dev)
    lane = b % 8
    kb = keys[:, None] ^ mix64(b - lane)[None, :]  # [M, B]
    kj = mix64(kb ^ _i64(((op + 1) << 56) & _M64))
    i = torch.arange(units, device=dev)
    h = mix64(kj[:, :, None] + 2 * i + (lane >= 4).long()[None, :, None])  # [M, B, U]
    u = (h >> (16 * (lane % 4))[None, :, None]) & 0xFFFF  # sign bits never reach the low 16
    r = rate.float()
    drop = torch.where(r >= 1.0, 65536.0, torch.floor(r * 65536.0 + 0.5))
    scale = torch.where(drop < 65536.0, 65536.0 / (65536.0 - drop), 0.0)
    keep = u.float() >= drop[:, None, None]
    return torch.where(keep, scale[:, None, None], 0.0)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


class FunctionalOptimizer:
    """SGD with momentum (coupled weight decay) and AdamW, on stacked parameters ``[N, ...]``.

    Per-network hyperparameters are ``[N]`` tensors; ``is_adam`` ``[N]`` bool picks the rule.
    :meth:`step` updates only networks where ``mask`` ``[N]`` is true.
    """

    def __init__(
        self,
        params: dict[str, torch.Tensor],
        lr: torch.Tensor,
        weight_decay: torch.Tensor,
        momentum: torch.Tensor,
        is_adam: torch.Tensor,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.lr, self.wd, self.mom, self.is_adam = lr, weight_decay, momentum, is_adam
        self.b1, self.b2 = betas
        self.eps = eps
        self.any_adam = bool(is_adam.any())
        self.any_sgd = bool((~is_adam).any())
        self.buf = {k: torch.zeros_like(p) for k, p in params.items()} if self.any_sgd else {}
        self.m = {k: torch.zeros_like(p) for k, p in params.items()} if self.any_adam else {}
        self.v = {k: torch.zeros_like(p) for k, p in params.items()} if self.any_adam else {}
        self.t = torch.zeros_like(lr)

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the networks where ``keep`` ``[N]`` is true (drop finished networks)."""
        self.lr, self.wd, self.mom = self.lr[keep], self.wd[keep], self.mom[keep]
        self.is_adam, self.t = self.is_adam[keep], self.t[keep]
        for state in (self.buf, self.m, self.v):
            for k in list(state):
                state[k] = state[k][keep]

    def step(
        self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """New parameters after one step (networks with ``mask == False`` are unchanged)."""
        self.t = self.t + mask.to(self.t.dtype)
        t = self.t.clamp_min(1.0)
        c1 = 1.0 - self.b1**t
        c2 = 1.0 - self.b2**t
        out = {}
        for k, p in params.items():
            g = grads[k]
            m_ = _bcast(mask, p)
            lr = _bcast(self.lr, p)
            wd = _bcast(self.wd, p)
            new = p
            if self.any_sgd:
                buf = _bcast(self.mom, p) * self.buf[k] + g + wd * p
                p_sgd = p - lr * buf
                self.buf[k] = torch.where(m_, buf, self.buf[k])
                new = p_sgd
            if self.any_adam:
                m = self.b1 * self.m[k] + (1 - self.b1) * g
                v = self.b2 * self.v[k] + (1 - self.b2) * g * g
                upd = (m / _bcast(c1, p)) / ((v / _bcast(c2, p)).sqrt() + self.eps)
                p_adam = p - lr * (upd + wd * p)
                self.m[k] = torch.where(m_, m, self.m[k])
                self.v[k] = torch.where(m_, v, self.v[k])
                new = (
                    p_adam
                    if not self.any_sgd
                    else torch.where(_bcast(self.is_adam, p), p_adam, new)
                )
            out[k] = torch.where(m_, new, p)
        return out


# ------------------------------------------------------------------------------------------------
# chunk training
# ------------------------------------------------------------------------------------------------
@dataclass
class ChunkData:
    """What a chunk trains on. Classification: ``x_train [n, ...]``, per-network labels
    ``y_train [N, n]`` (long), subset ``mask [N, n]``, and clean eval sets. Regression (SIREN):
    ``x_train`` shared coordinates, ``y_train [N, n, out]`` float per-network targets."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    subset: torch.Tensor
    x_eval: dict[str, torch.Tensor]
    y_eval: dict[str, torch.Tensor]
    regression: bool = False
    # per split, ``[N, n_eval]`` bool: the samples each network is scored on (class-subset
    # tasks); a split without an entry scores every network on all its samples
    eval_masks: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


def _loss(out: torch.Tensor, y: torch.Tensor, regression: bool) -> torch.Tensor:
    if regression:
        return ((out - y) ** 2).mean(dim=-1)
    return F.cross_entropy(out, y, reduction="none")


def train_chunk(
    arch: dict[str, Any],
    plans: Sequence[NetworkPlan],
    data: ChunkData,
    keep_fractions: Sequence[float],
    device: torch.device | str = "cpu",
    generator_seed: int = 0,
    on_step: Callable[[int, int], None] | None = None,
    eval_batch: int = 512,
    extra_metrics: dict[str, Sequence[Any]] | None = None,
    engine: str = "auto",
) -> ChunkResult:
    """Train the networks ``plans`` (all of architecture ``arch``) together; return records.

    ``engine``: ``"vmap"`` (``torch.func``: any arch, including norm layers and residual
    blocks), ``"batched"`` (:mod:`metanet.zoo.batched`: hand-batched matmuls over a flat
    parameter buffer, several times faster; MLPs, SIRENs and CNNs without norm/residual) or
    ``"auto"`` (batched where supported, else vmap). Both give the same records up to float
    rounding.

    Each network yields one record per distinct kept epoch ``max(1, round(f * epochs))``.
    Metrics per record: ``train_loss/train_acc`` and ``test_loss/test_acc`` (classification: on
    the clean full train / test split; SIREN: MSE and the fraction of pixels within half a gray
    level (1/32), both on all pixels), ``epoch``, ``run_id``, ``seed``, ``diverged`` (0/1),
    ``final`` (1 on the last epoch), ``psnr`` for SIRENs, and ``extra_metrics`` (name -> one
    value per network, e.g. an INR's digit ``label``) copied to each of the network's records.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
    if engine != "vmap":
        from metanet.zoo import batched

        if batched.supports(arch):
            return batched.train_chunk_batched(
                arch, plans, data, keep_fractions, device=device, generator_seed=generator_seed,
                on_step=on_step, eval_batch=eval_batch, extra_metrics=extra_metrics,
            )  # fmt: skip
        if engine == "batched":
            raise ValueError(f"the batched engine does not train {arch} (use engine='vmap')")
    device = torch.device(device)
    n = len(plans)
    hp = [p.hparams for p in plans]

    def col(key: str, default: Any, dtype=torch.float32) -> torch.Tensor:
        return hparam_column(plans, key, default, dtype, device)

    modules = init_networks(arch, plans)
    template = build_module(arch).to(device)
    params = {
        k: torch.stack([dict(m.named_parameters())[k].detach() for m in modules]).to(device)
        for k, _ in template.named_parameters()
    }
    buffers = {
        k: torch.stack([dict(m.named_buffers())[k].detach() for m in modules]).to(device).clone()
        for k, _ in template.named_buffers()
    }
    drop_keys = [k for k, b in template.named_modules() if isinstance(b, SampledDropout)]
    dropout = col("dropout", 0.0)
    for k in drop_keys:
        buffers[f"{k}.p"] = dropout.clone()
    use_dropout = bool(drop_keys) and bool((dropout > 0).any())
    drop_layout = (_dropout_layout(arch, template, drop_keys, data.x_train[:1])
                   if use_dropout else [])  # fmt: skip
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in template.modules())

    n_train = data.x_train.shape[0]
    subset_size = data.subset.sum(1).to(device)  # [N]
    batch, steps_per_epoch, epochs, keep = step_schedule(
        plans, subset_size, n_train, keep_fractions, device
    )
    e_max = int(epochs.max())
    total_steps = epochs * steps_per_epoch
    b_max = int(batch.max())
    t_max = int(total_steps.max())

    opt = FunctionalOptimizer(
        params,
        lr=col("lr", 0.01),
        weight_decay=col("weight_decay", 0.0),
        momentum=col("momentum", 0.9),
        is_adam=torch.tensor([h.get("optimizer", "adam") == "adam" for h in hp], device=device),
    )
    snaps = [
        {k: v.clone() for k, v in {**params, **_persistent(buffers, drop_keys)}.items()}
        for _ in keep_fractions
    ]
    diverged_all = torch.zeros(n, dtype=torch.bool, device=device)
    regression = data.regression
    x_train = data.x_train.to(device)
    mse_target, has_target = psnr_targets(plans, device)
    stop_step = total_steps.clone()  # updates each network made (early stop: fewer)
    # per-network state of the networks still training ("alive"); finished networks are
    # dropped from the vmap batch, so a chunk costs the sum of its networks' steps
    alive = torch.arange(n, device=device)
    st: dict[str, torch.Tensor] = {
        "y": data.y_train.to(device),
        "subset_size": subset_size,
        "batch": batch,
        "spe": steps_per_epoch,
        "total": total_steps,
        "keep": keep,
        "diverged": torch.zeros(n, dtype=torch.bool, device=device),
        "orders": sample_orders(data.subset, e_max, generator_seed, device),
        "reached": torch.zeros(n, dtype=torch.bool, device=device),
        "mse_target": mse_target,
    }
    arange_b = torch.arange(b_max, device=device)
    template.train()

    def loss_fn(p, b, x, y, w):
        out = functional_call(template, (p, b), (x,))
        return (_loss(out, y, regression) * w).sum()

    step_fn = vmap(grad_and_value(loss_fn), randomness="different")
    for t in range(t_max):
        m = alive.shape[0]
        pos = t % st["spe"]
        order = st["orders"][torch.arange(m, device=device), (t // st["spe"]).clamp(max=e_max - 1)]
        offs = (pos * st["batch"])[:, None] + arange_b[None, :]  # [M, B]
        valid = (arange_b[None, :] < st["batch"][:, None]) & (offs < st["subset_size"][:, None])
        idx = order.gather(1, offs.clamp(max=n_train - 1))
        xb = x_train[idx]
        y_all = st["y"]
        yb = (
            y_all.gather(1, idx)
            if not regression
            else torch.gather(y_all, 1, idx[..., None].expand(-1, -1, y_all.shape[-1]))
        )
        wb = valid.float() / valid.sum(1, keepdim=True).clamp_min(1).float()
        if use_dropout:  # the masks of (network, step) that every engine draws
            keys = dropout_keys(generator_seed, alive, torch.full_like(alive, t))
            for k, op, shape in drop_layout:
                mult = dropout_multipliers(keys, buffers[f"{k}.p"], op, b_max, math.prod(shape))
                buffers[f"{k}.mult"] = mult.view(m, b_max, *shape)
        old_buffers = {k: v.clone() for k, v in buffers.items()} if has_bn else None
        grads, losses = step_fn(params, buffers, xb, yb, wb)
        finite = torch.isfinite(losses)
        for g in grads.values():
            finite &= torch.isfinite(g.flatten(1)).all(1)
        upd = ~st["diverged"] & finite & ~st["reached"]
        st["diverged"] |= ~finite
        if has_target:  # early stop: this step's loss (full batch) already reaches the target
            newly = upd & (losses <= st["mse_target"])
            stop_step[alive[newly]] = t
            st["reached"] |= newly
            upd &= ~newly
        params = opt.step(params, grads, upd)
        if old_buffers is not None:
            for k in buffers:
                if k.endswith((".p", ".mult")):
                    continue
                buffers[k] = torch.where(_bcast(upd, buffers[k]), buffers[k], old_buffers[k])
        done_epoch = (t + 1) % st["spe"] == 0
        if bool(done_epoch.any()):
            epoch_now = (t + 1) // st["spe"]
            state = {**params, **_persistent(buffers, drop_keys)}
            for k_slot, snap in enumerate(snaps):
                hit = done_epoch & (st["keep"][:, k_slot] == epoch_now)
                if bool(hit.any()):
                    for key, v in state.items():
                        snap[key][alive[hit]] = v[hit]
        if on_step is not None:
            on_step(t + 1, t_max)
        if has_target and bool((st["reached"] | st["diverged"]).all()):
            # every network left has stopped: its later checkpoints are its current weights
            epoch_done = (t + 1) // st["spe"]
            state = {**params, **_persistent(buffers, drop_keys)}
            for k_slot, snap in enumerate(snaps):
                later = st["keep"][:, k_slot] > epoch_done
                for key, v in state.items():
                    snap[key][alive[later]] = v[later]
            diverged_all[alive] = st["diverged"]
            break
        finished = st["total"] <= t + 1
        if bool(finished.any()):
            diverged_all[alive[finished]] = st["diverged"][finished]
            left = ~finished
            alive = alive[left]
            if alive.numel() == 0:
                break
            params = {k: v[left] for k, v in params.items()}
            buffers = {k: v[left] for k, v in buffers.items()}
            st = {k: v[left] for k, v in st.items()}
            opt.select(left)
    diverged = diverged_all
    if has_target:
        extra_metrics = {**(extra_metrics or {}), "steps": stop_step.tolist()}
    return _evaluate(
        template,
        plans,
        data,
        snaps,
        keep,
        epochs,
        diverged,
        drop_keys,
        device,
        eval_batch,
        extra_metrics or {},
    )


def _dropout_layout(arch: dict[str, Any], template: nn.Module, drop_keys: list[str],
                    x: torch.Tensor) -> list[tuple[str, int, tuple[int, ...]]]:  # fmt: skip
    """``(module name, op number, input shape)`` of each dropout layer: the op number is its
    position in the chain of :class:`metanet.zoo.batched.BatchedNet` (what the other engines and
    the C kernels key their masks by) where that engine trains the arch, else its rank."""
    shapes: dict[str, tuple[int, ...]] = {}
    mods = dict(template.named_modules())
    hooks = [mods[k].register_forward_pre_hook(
        lambda mod, args, k=k: shapes.__setitem__(k, tuple(args[0].shape[1:])))
        for k in drop_keys]  # fmt: skip
    try:
        with torch.no_grad():
            template.eval()(x.to(next(template.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        template.train()
    from metanet.zoo import batched

    ops = list(range(len(drop_keys)))
    if batched.supports(arch):
        ops = [j for j, op in enumerate(batched.BatchedNet(arch).ops) if op.kind == "dropout"]
    return [(k, op, shapes[k]) for k, op in zip(drop_keys, ops)]


def _persistent(buffers: dict[str, torch.Tensor], drop_keys: list[str]) -> dict[str, torch.Tensor]:
    """Buffers that belong in the state_dict (not the dropout rates and masks)."""
    skip = {f"{k}.{b}" for k in drop_keys for b in ("p", "mult")}
    return {k: v for k, v in buffers.items() if k not in skip}


@torch.no_grad()
def _evaluate(
    template: nn.Module,
    plans: Sequence[NetworkPlan],
    data: ChunkData,
    snaps: list[dict[str, torch.Tensor]],
    keep: torch.Tensor,
    epochs: torch.Tensor,
    diverged: torch.Tensor,
    drop_keys: list[str],
    device: torch.device,
    eval_batch: int,
    extra_metrics: dict[str, Sequence[Any]],
) -> ChunkResult:
    template.eval()
    param_keys = {k for k, _ in template.named_parameters()}
    regression = data.regression

    def forward(p_and_b, x):
        p = {k: v for k, v in p_and_b.items() if k in param_keys}
        b = {k: v for k, v in p_and_b.items() if k not in param_keys}
        return functional_call(template, (p, b), (x,))

    n = len(plans)
    results: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for k_slot, snap in enumerate(snaps):
        state = dict(snap)
        for k in drop_keys:
            state[f"{k}.p"] = torch.zeros(n, device=device)
        for split, x in data.x_eval.items():
            x = x.to(device)
            y = data.y_eval[split].to(device)
            loss_sum = torch.zeros(n, device=device)
            acc_sum = torch.zeros(n, device=device)
            shared = y.dim() == (1 if not regression else 2)  # same targets for every network
            scored = data.eval_masks.get(split)
            scored = scored.to(device).float() if scored is not None else None
            for s in range(0, x.shape[0], eval_batch):
                xb = x[s : s + eval_batch]
                out = vmap(forward, in_dims=(0, None))(state, xb)  # [N, b, C]
                yb = y[s : s + eval_batch] if shared else y[:, s : s + eval_batch]
                yb = yb.expand(n, *yb.shape) if shared else yb
                if regression:
                    err = out - yb
                    loss_sum += (err**2).mean(-1).sum(1)
                    acc_sum += (err.abs() < 1.0 / 32.0).float().mean(-1).sum(1)
                else:
                    w = scored[:, s : s + eval_batch] if scored is not None else 1.0
                    ce = F.cross_entropy(out.flatten(0, 1), yb.flatten(), reduction="none")
                    loss_sum += (ce.view(n, -1) * w).sum(1)
                    acc_sum += ((out.argmax(-1) == yb).float() * w).sum(1)
            count = scored.sum(1).clamp_min(1) if scored is not None else x.shape[0]
            results[(k_slot, split)] = (loss_sum / count, acc_sum / count)

    records: list[tuple[int, int, int]] = []
    for i in range(n):
        seen = set()
        for k_slot in range(len(snaps)):
            e = int(keep[i, k_slot])
            if e not in seen:
                seen.add(e)
                records.append((i, k_slot, e))
    params = {
        key: torch.stack([snaps[k_slot][key][i].cpu() for i, k_slot, _ in records])
        for key in snaps[0]
    }
    stats = {}
    for split in data.x_eval:
        for j, name in enumerate(("loss", "acc")):
            stats[f"{split}_{name}"] = torch.stack(
                [results[(k_slot, split)][j][i].cpu() for i, k_slot, _ in records]
            )
    return assemble_records(
        plans, records, params, stats, epochs.cpu(), diverged.cpu(), regression, extra_metrics
    )


def assemble_records(
    plans: Sequence[NetworkPlan],
    records: Sequence[tuple[int, int, int]],
    params: dict[str, torch.Tensor],
    stats: dict[str, torch.Tensor],
    epochs: torch.Tensor,
    diverged: torch.Tensor,
    regression: bool,
    extra_metrics: dict[str, Sequence[Any]],
) -> ChunkResult:
    """Records of a chunk from ``records`` ``[(network, slot, epoch)]`` (R of them), their
    ``params`` ``{key: [R, ...]}`` and ``stats`` ``{train_loss, train_acc, test_loss, test_acc}``
    (plus ``val_loss``/``val_acc`` when the data has a validation split) ``[R]``;
    ``epochs``/``diverged`` are per network ``[N]``."""
    metrics: dict[str, list[Any]] = {
        k: []
        for k in (
            "train_loss",
            "train_acc",
            "test_loss",
            "test_acc",
            "epoch",
            "run_id",
            "seed",
            "diverged",
            "final",
        )  # fmt: skip
    }
    if regression:
        metrics["psnr"] = []
    for k, values in extra_metrics.items():
        if len(values) != len(plans):
            raise ValueError(f"extra metric '{k}' has {len(values)} values for {len(plans)} nets")
        metrics[k] = []
    split_keys = [k for k in stats if k.endswith(("_loss", "_acc"))]  # train, test (, val)
    for k in split_keys:
        metrics.setdefault(k, [])
    hkeys = sorted(plans[0].hparams)
    hparams: dict[str, list[Any]] = {k: [] for k in hkeys}
    vals = {k: v.tolist() for k, v in stats.items()}
    for r, (i, _, e) in enumerate(records):
        plan = plans[i]
        for k in split_keys:
            metrics[k].append(float(vals[k][r]))
        metrics["epoch"].append(e)
        metrics["run_id"].append(plan.run_id)
        metrics["seed"].append(plan.seed)
        metrics["diverged"].append(int(diverged[i]))
        metrics["final"].append(int(e == int(epochs[i])))
        if regression:
            mse = float(vals["test_loss"][r])
            metrics["psnr"].append(10 * math.log10(1.0 / max(mse, 1e-12)))
        for k, values in extra_metrics.items():
            metrics[k].append(values[i])
        for k in hkeys:
            hparams[k].append(plan.hparams[k])
    return ChunkResult(
        params={k: v.contiguous() for k, v in params.items()},
        metrics={k: np.asarray(v) for k, v in metrics.items()},
        hparams={k: np.asarray(v) for k, v in hparams.items()},
    )


# ------------------------------------------------------------------------------------------------
# task data
# ------------------------------------------------------------------------------------------------
def classifier_data(plans: Sequence[NetworkPlan], flat: bool, task: TaskData,
                    tasks: Mapping[str, Sequence[int]] | None = None) -> ChunkData:  # fmt: skip
    """A chunk's data for classifier networks of ``task`` (any provider): per-network train
    subsets (``train_fraction``) and noisy labels (``label_noise``: that fraction of train labels
    replaced by uniform random classes), drawn from each network's seed; evaluation on the clean
    splits (train, test, and val when the data has one). ``flat``: inputs flattened (MLPs).
    ``tasks`` (name -> classes): a network with hparam ``task`` trains on a subset of that task's
    samples only and is scored on them (``eval_masks``)."""
    from metanet.zoo.data import in_memory

    splits = {"train": in_memory(task.train, "train"), "test": in_memory(task.test, "test")}
    if task.val is not None:
        splits["val"] = in_memory(task.val, "val")
    if flat:
        splits = {k: (x.flatten(1), y) for k, (x, y) in splits.items()}
    x_tr, y_tr = splits["train"]
    n_train, classes = x_tr.shape[0], int(task.num_classes)
    labels, masks = [], []
    own = [_task_classes(p, tasks) for p in plans]
    for plan, mine in zip(plans, own):
        g = torch.Generator().manual_seed(plan.seed + 1)
        frac = float(plan.hparams.get("train_fraction", 1.0))
        pool = (torch.arange(n_train) if mine is None
                else torch.nonzero(torch.isin(y_tr, mine)).flatten())  # fmt: skip
        size = max(1, int(round(frac * len(pool))))
        mask = torch.zeros(n_train, dtype=torch.bool)
        mask[pool[torch.randperm(len(pool), generator=g)[:size]]] = True
        noise = float(plan.hparams.get("label_noise", 0.0))
        flip = torch.rand(n_train, generator=g) < noise
        rand = torch.randint(0, classes, (n_train,), generator=g)
        labels.append(torch.where(flip, rand, y_tr))
        masks.append(mask)
    eval_masks = {}
    if any(c is not None for c in own):
        eval_masks = {k: torch.stack([torch.ones(len(y), dtype=torch.bool) if c is None
                                      else torch.isin(y, c) for c in own])
                      for k, (_, y) in splits.items()}  # fmt: skip
    return ChunkData(
        x_train=x_tr,
        y_train=torch.stack(labels),
        subset=torch.stack(masks),
        x_eval={k: x for k, (x, _) in splits.items()},
        y_eval={k: y for k, (_, y) in splits.items()},
        eval_masks=eval_masks,
    )


def _task_classes(plan: NetworkPlan, tasks: Mapping[str, Sequence[int]] | None
                  ) -> torch.Tensor | None:  # fmt: skip
    name = plan.hparams.get("task")
    if name is None:
        return None
    if not tasks or name not in tasks:
        raise ValueError(f"network {plan.run_id} has task {name!r}, which the zoo does not list")
    return torch.as_tensor(list(tasks[name]), dtype=torch.long)


def siren_data(plans: Sequence[NetworkPlan], task: TaskData) -> tuple[ChunkData, list[int]]:
    """A chunk's data for SIRENs: network ``i`` fits signal ``plans[i].image_index`` of split
    ``plans[i].split`` (0 train, 1 test) of ``task`` (images of any size and channel count, or
    1-D signals: :class:`metanet.data.providers.signals.SignalData`), values ``[P, C]`` over the
    signal's coordinate grid ``[P, d]``. Returns the data and each signal's label (-1 when the
    data has no class labels)."""
    from metanet.data.providers.signals import SignalData

    signals = {s: SignalData.from_task(task, name) for s, name in ((0, "train"), (1, "test"))
               if any(p.split == s for p in plans)}  # fmt: skip
    targets, labels = [], []
    for plan in plans:
        sig = signals[plan.split]
        if not 0 <= plan.image_index < len(sig):
            raise ValueError(f"image {plan.image_index} is outside split {plan.split} "
                             f"({len(sig)} signals)")  # fmt: skip
        targets.append(sig.values[plan.image_index])
        known = (sig.labels is not None and sig.labels.dim() == 1
                 and not sig.labels.is_floating_point())  # fmt: skip
        labels.append(int(sig.labels[plan.image_index]) if known else -1)
    coords = next(iter(signals.values())).coords
    y = torch.stack(targets)  # [N, P, C]
    n, points = len(plans), coords.shape[0]
    return (
        ChunkData(
            x_train=coords,
            y_train=y,
            subset=torch.ones(n, points, dtype=torch.bool),
            x_eval={"train": coords, "test": coords},
            y_eval={"train": y, "test": y},
            regression=True,
        ),
        labels,
    )
