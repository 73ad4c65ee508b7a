"""What every training engine of the zoo builder shares, so that engines differ only in arithmetic.

The reference ``torch.func`` engine (:mod:`metanet.zoo.train`), the hand-batched engine
(:mod:`metanet.zoo.batched`) and the C kernels it drives (:mod:`metanet.zoo.native`) all read
from this module:

* the step schedule (:func:`step_schedule`: batch size, steps per epoch, epochs and kept
  checkpoint epochs of every network; :func:`psnr_targets`: early stops; :func:`kept_records`: the
  (network, slot, epoch) records a chunk yields; :func:`plan_lanes`: how the batched engine lays
  networks of unequal length onto the rows of its batch);
* the random draws: initial weights (:func:`init_network`, :func:`init_rows`), the sample order of
  every network and epoch (:func:`sample_orders`) and the dropout masks of every network and step
  (:func:`dropout_keys`, :func:`dropout_multipliers`, bit for bit the masks of ``_chain.c``);
* what a chunk trains on (:class:`ChunkData`) and the records it returns (:class:`ChunkResult`,
  :func:`assemble_records`).

The optimizers (SGD with momentum, AdamW) live in :mod:`metanet.zoo.optim`, one implementation for
both parameter layouts. Train subsets and label noise are drawn with the chunk's data
(:func:`metanet.zoo.train.classifier_data`), before any engine runs.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from metanet.zoo.architectures import ACTIVATIONS, SampledDropout, build_module, normalize_arch
from metanet.zoo.recipe import NetworkPlan

if TYPE_CHECKING:
    from metanet.data.tasks import LazyArray


# ------------------------------------------------------------------------------------------------
# what a chunk trains on and what it returns
# ------------------------------------------------------------------------------------------------
@dataclass
class ChunkData:
    """What a chunk trains on. Classification: ``x_train [n, ...]``, per-network labels
    ``y_train [N, n]`` (long), subset ``mask [N, n]``, and clean eval sets. Regression (SIREN):
    ``x_train`` shared coordinates, ``y_train [N, n, out]`` float per-network targets. Inputs
    larger than memory may be :class:`~metanet.data.tasks.LazyArray` s (streamed; the vmap
    engine of :mod:`metanet.zoo.train` trains on them)."""

    x_train: torch.Tensor | LazyArray
    y_train: torch.Tensor
    subset: torch.Tensor
    x_eval: dict[str, torch.Tensor | LazyArray]
    y_eval: dict[str, torch.Tensor]
    regression: bool = False
    # per split, ``[N, n_eval]`` bool: the samples each network is scored on (class-subset
    # tasks); a split without an entry scores every network on all its samples
    eval_masks: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


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


def init_network(arch: dict[str, Any], seed: int, scheme: str = "default",
                 scale: float = 1.0) -> nn.Module:  # fmt: skip
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
    plans: Sequence[NetworkPlan],
    key: str,
    default: Any,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The hyperparameter ``key`` of every plan as a tensor ``[N]`` (``default`` where unset)."""
    return torch.tensor([p.hparams.get(key, default) for p in plans], dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------------
# the step schedule
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


def kept_records(keep: torch.Tensor) -> list[tuple[int, int, int]]:
    """The records a chunk yields: ``(network, slot, epoch)`` for each distinct kept epoch of
    every network, in network then slot order, from ``keep`` ``[N, K]`` (:func:`step_schedule`;
    two slots that round to the same epoch give one record)."""
    records: list[tuple[int, int, int]] = []
    for i, row in enumerate(keep.tolist()):
        seen = set()
        for k_slot, e in enumerate(row):
            if e not in seen:
                seen.add(e)
                records.append((i, k_slot, int(e)))
    return records


def plan_lanes(steps: Sequence[int], groups: Sequence[int]) -> list[list[int]]:
    """Assign networks (``steps[i]`` training steps, pool ``groups[i]``) to *lanes*: rows of
    the batch that train their networks one after another (continuous batching). Per pool,
    ``ceil(sum / max)`` lanes (``max``: the longest network of the chunk, which bounds the
    chunk's steps anyway), filled longest-first into the least-loaded lane. Returns the
    lanes (lists of network indices in training order), pool 0 first."""
    longest = max(steps)
    lanes: list[list[int]] = []
    for g in sorted(set(groups)):
        mine = sorted((i for i in range(len(steps)) if groups[i] == g),
                      key=lambda i: (-steps[i], i))  # fmt: skip
        count = min(len(mine), math.ceil(sum(steps[i] for i in mine) / longest))
        heap = [(0, j) for j in range(count)]
        pool: list[list[int]] = [[] for _ in range(count)]
        for i in mine:
            load, j = heapq.heappop(heap)
            pool[j].append(i)
            heapq.heappush(heap, (load + steps[i], j))
        lanes += pool
    return lanes


# ------------------------------------------------------------------------------------------------
# random draws: sample orders and dropout masks
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# records
# ------------------------------------------------------------------------------------------------
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
