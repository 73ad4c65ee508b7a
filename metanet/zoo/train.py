"""Train many networks of one architecture at once with ``torch.func`` (vmap over stacked params).

All ``N`` networks of a chunk share one module *structure*; their parameters are stacked
(``{key: [N, *shape]}``) and one step is ``vmap(grad(loss))`` over ``functional_call``. Everything
that differs between networks is a batched tensor:

* learning rate, weight decay, momentum, optimizer (SGD with momentum / AdamW) — per-row
  hyperparameters of :class:`metanet.zoo.optim.RowOptimizer`, the one optimizer of every engine,
  updating the stacked tensors in place (networks laid out SGD first);
* dropout rate — a per-network buffer of :class:`~metanet.zoo.architectures.SampledDropout`, masks
  drawn with ``vmap(randomness="different")``;
* train fraction and label noise — per-network label tables ``[N, n_train]`` and subset masks;
* batch size — every network draws its own batch from its own shuffled subset; the batch tensor
  is ``[N, B_max, ...]`` and a per-sample weight ``[N, B_max]`` (``1/b_n`` on the ``b_n`` real
  samples, 0 on padding) makes the loss each network's own mean over its own batch;
* epochs — network ``n`` runs ``epochs_n * ceil(n_sub / b_n)`` steps; once done (or once its
  loss/gradient is not finite: "diverged") its parameters stop changing.

Chunks are built so networks of similar batch size and step count train together (little padding).
Checkpoints are snapshots of each network at its kept epochs, evaluated after training in one vmap.

The schedule (steps, kept epochs, early stops), the random draws (initial weights, sample orders,
dropout masks) and the records are those of :mod:`metanet.zoo.schedule`, the optimizer that of
:mod:`metanet.zoo.optim`, shared with the other engines so that engines differ only in arithmetic;
their names stay importable from here.

This ``torch.func`` engine trains any architecture (norm layers, residual blocks). For plain
chains (MLPs, CNNs without norm/residual, SIRENs) :func:`train_chunk` uses the several times faster
hand-batched engine of :mod:`metanet.zoo.batched` by default (``engine="auto"``); both give the
same networks up to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from metanet.zoo import batched
from metanet.zoo.architectures import SampledDropout, build_module
from metanet.zoo.optim import RowOptimizer, optimizer_hparams, optimizer_order, uses_adam
from metanet.zoo.recipe import NetworkPlan
from metanet.zoo.schedule import (  # re-exported: the names every engine shares
    ChunkData,
    ChunkResult,
    assemble_records,
    dropout_keys,
    dropout_multipliers,
    hparam_column,
    init_network,
    init_networks,
    init_rows,
    kept_records,
    mix64,
    psnr_targets,
    sample_orders,
    step_schedule,
)

if TYPE_CHECKING:
    from metanet.data.tasks import TaskData

__all__ = [
    "ENGINES",
    "ChunkData",
    "ChunkResult",
    "assemble_records",
    "classifier_data",
    "dropout_keys",
    "dropout_multipliers",
    "hparam_column",
    "init_network",
    "init_networks",
    "init_rows",
    "kept_records",
    "mix64",
    "psnr_targets",
    "resolve_engine",
    "sample_orders",
    "siren_data",
    "step_schedule",
    "train_chunk",
    "vmap_step",
]

ENGINES = ("auto", "batched", "vmap")
# arithmetic revisions of an engine: bumped when its numbers change, so that a resumed build's
# fingerprint never mixes chunks of two revisions (vmap 2: the shared RowOptimizer arithmetic)
ENGINE_REVISIONS: dict[str, int] = {"vmap": 2}


_BATCHED_NEEDS_MEMORY = (
    "the batched engine needs the data in memory, and it is over the memory limit (use "
    "engine='vmap', which streams it, or raise METANET_MEMORY_LIMIT_GB)"
)


def _streamed(data: ChunkData) -> bool:
    """Whether a chunk's inputs (train or eval) are read from disk on demand."""
    return any(not isinstance(x, torch.Tensor) for x in (data.x_train, *data.x_eval.values()))


def _gather(x: Any, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x[idx]`` on ``device`` for in-memory or streamed inputs (these read each distinct row of
    the step once)."""
    if isinstance(x, torch.Tensor):
        return x[idx]
    return x.take(idx).to(device)


def engine_fingerprint(engine: str) -> str:
    """The name of a resolved engine as the zoo fingerprint records it (with its revision)."""
    rev = ENGINE_REVISIONS.get(engine)
    return engine if rev is None else f"{engine}/{rev}"


def resolve_engine(arch: dict[str, Any], engine: str = "auto", regression: bool = False,
                   device: torch.device | str = "cpu", task: TaskData | None = None
                   ) -> str:  # fmt: skip
    """The engine that really trains ``arch`` when ``engine`` is asked for: ``"native"`` (the
    batched engine running the fused C kernels), ``"batched"`` or ``"vmap"``. It is part of a
    zoo's fingerprint, so a resumed or sharded build never mixes engines (their results agree
    only up to float rounding).

    ``task``: the classifier data the arch trains on. When it streams (a split larger than the
    memory limit stays on disk, :func:`metanet.zoo.data.streams`) the engine is ``"vmap"``, the
    one that reads each step's rows on demand (the others need the data in memory).

    Raises:
        ValueError: an unknown engine, or ``"batched"`` for an arch or data it does not train.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
    if engine == "vmap":
        return "vmap"
    if task is not None and not regression:
        from metanet.zoo.data import streams

        if streams(task):
            if engine == "batched":
                raise ValueError(_BATCHED_NEEDS_MEMORY)
            return "vmap"
    if not batched.supports(arch):
        if engine == "batched":
            raise ValueError(f"the batched engine does not train {arch} (use engine='vmap')")
        return "vmap"
    native = batched.native_chain(batched.BatchedNet(arch), torch.device(device), regression)
    return "batched" if native is None else "native"


# ------------------------------------------------------------------------------------------------
# chunk training
# ------------------------------------------------------------------------------------------------
def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def _loss(out: torch.Tensor, y: torch.Tensor, regression: bool) -> torch.Tensor:
    if regression:
        return ((out - y) ** 2).mean(dim=-1)
    return F.cross_entropy(out, y, reduction="none")


def vmap_step(template: nn.Module, regression: bool = False) -> Callable[..., Any]:
    """The reference engine's gradient step of ``M`` networks of ``template``'s structure:
    ``step(params, buffers, x, y, w) -> (grads, losses)`` with stacked ``params``/``buffers``
    ``{key: [M, ...]}``, batches ``x`` ``[M, B, ...]``, targets ``y`` ``[M, B(, out)]`` and
    per-sample loss weights ``w`` ``[M, B]`` (each network's loss is ``sum_b w * loss_b``:
    cross-entropy, or the MSE for ``regression``). ``scripts/bench_zoo_compile.py`` times it
    eager and under ``torch.compile``."""

    def loss_fn(p, b, x, y, w):
        out = functional_call(template, (p, b), (x,))
        return (_loss(out, y, regression) * w).sum()

    return vmap(grad_and_value(loss_fn), randomness="different")


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
    rounding. Streamed inputs (a :class:`~metanet.data.tasks.LazyArray` in ``data``, see
    :func:`classifier_data`) train on the vmap engine, which reads each step's rows from disk:
    ``"auto"`` picks it (as :func:`resolve_engine` does for such data), ``"batched"`` is refused.

    Each network yields one record per distinct kept epoch ``max(1, round(f * epochs))``.
    Metrics per record: ``train_loss/train_acc`` and ``test_loss/test_acc`` (classification: on
    the clean full train / test split; SIREN: MSE and the fraction of pixels within half a gray
    level (1/32), both on all pixels), ``epoch``, ``run_id``, ``seed``, ``diverged`` (0/1),
    ``final`` (1 on the last epoch), ``psnr`` for SIRENs, and ``extra_metrics`` (name -> one
    value per network, e.g. an INR's digit ``label``) copied to each of the network's records.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
    streamed = _streamed(data)
    if streamed and engine == "batched":
        raise ValueError(_BATCHED_NEEDS_MEMORY)
    if engine != "vmap" and not streamed:
        if batched.supports(arch):
            return batched.train_chunk_batched(
                arch, plans, data, keep_fractions, device=device, generator_seed=generator_seed,
                on_step=on_step, eval_batch=eval_batch, extra_metrics=extra_metrics,
            )  # fmt: skip
        if engine == "batched":
            raise ValueError(f"the batched engine does not train {arch} (use engine='vmap')")
    device = torch.device(device)
    n = len(plans)
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
    dropout = hparam_column(plans, "dropout", 0.0, device=device)
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

    snaps = [
        {k: v.clone() for k, v in {**params, **_persistent(buffers, drop_keys)}.items()}
        for _ in keep_fractions
    ]
    diverged_all = torch.zeros(n, dtype=torch.bool, device=device)
    regression = data.regression
    x_train = data.x_train.to(device) if isinstance(data.x_train, torch.Tensor) else data.x_train
    if not isinstance(x_train, torch.Tensor):  # streamed: each step reads its rows
        from metanet.zoo.data import check_stream_batch

        check_stream_batch(2 * n * b_max, x_train, f"one training step of {n} networks x "
                           f"{b_max} samples of the zoo's streamed data")  # fmt: skip
    mse_target, has_target = psnr_targets(plans, device)
    stop_step = total_steps.clone()  # updates each network made (early stop: fewer)
    # per-network state of the networks still training ("alive": their indices in the chunk, one
    # row each, SGD networks first as the optimizer wants); finished networks are dropped from
    # the vmap batch, so a chunk costs the sum of its networks' steps
    is_adam = uses_adam(plans)
    alive = torch.tensor(optimizer_order(is_adam), dtype=torch.long, device=device)
    lr, wd, mom = optimizer_hparams(plans, device)
    params = {k: v[alive] for k, v in params.items()}
    buffers = {k: v[alive] for k, v in buffers.items()}
    opt = RowOptimizer(params, lr[alive], wd[alive], mom[alive], k_sgd=is_adam.count(False))
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
    st = {k: v[alive] for k, v in st.items()}
    arange_b = torch.arange(b_max, device=device)
    template.train()
    step_fn = vmap_step(template, regression)
    for t in range(t_max):
        m = alive.shape[0]
        pos = t % st["spe"]
        order = st["orders"][torch.arange(m, device=device), (t // st["spe"]).clamp(max=e_max - 1)]
        offs = (pos * st["batch"])[:, None] + arange_b[None, :]  # [M, B]
        valid = (arange_b[None, :] < st["batch"][:, None]) & (offs < st["subset_size"][:, None])
        idx = order.gather(1, offs.clamp(max=n_train - 1))
        xb = _gather(x_train, idx, device)
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
        opt.step(params, grads, frozen=~upd)  # in place
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
    states = []
    for snap in snaps:
        state = dict(snap)
        for k in drop_keys:
            state[f"{k}.p"] = torch.zeros(n, device=device)
        states.append(state)
    for split, x in data.x_eval.items():
        lazy = not isinstance(x, torch.Tensor)  # streamed: each batch is read once, for all slots
        if lazy:
            from metanet.zoo.data import check_stream_batch

            check_stream_batch(min(eval_batch, len(x)), x, "one evaluation batch of the zoo's "
                               "streamed data")  # fmt: skip
        else:
            x = x.to(device)
        y = data.y_eval[split].to(device)
        sums = [(torch.zeros(n, device=device), torch.zeros(n, device=device)) for _ in snaps]
        shared = y.dim() == (1 if not regression else 2)  # same targets for every network
        scored = data.eval_masks.get(split)
        scored = scored.to(device).float() if scored is not None else None
        for s in range(0, x.shape[0], eval_batch):
            xb = x[s : s + eval_batch]
            xb = xb.to(device) if lazy else xb
            yb = y[s : s + eval_batch] if shared else y[:, s : s + eval_batch]
            yb = yb.expand(n, *yb.shape) if shared else yb
            w = scored[:, s : s + eval_batch] if scored is not None else 1.0
            for state, (loss_sum, acc_sum) in zip(states, sums):
                out = vmap(forward, in_dims=(0, None))(state, xb)  # [N, b, C]
                if regression:
                    err = out - yb
                    loss_sum += (err**2).mean(-1).sum(1)
                    acc_sum += (err.abs() < 1.0 / 32.0).float().mean(-1).sum(1)
                else:
                    ce = F.cross_entropy(out.flatten(0, 1), yb.flatten(), reduction="none")
                    loss_sum += (ce.view(n, -1) * w).sum(1)
                    acc_sum += ((out.argmax(-1) == yb).float() * w).sum(1)
        count = scored.sum(1).clamp_min(1) if scored is not None else x.shape[0]
        for k_slot, (loss_sum, acc_sum) in enumerate(sums):
            results[(k_slot, split)] = (loss_sum / count, acc_sum / count)

    records = kept_records(keep)
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
    samples only and is scored on them (``eval_masks``). A split larger than the memory limit
    stays on disk (its :class:`~metanet.data.tasks.LazyArray`, flattened lazily for MLPs): the
    ``vmap`` engine then reads each step's rows, and evaluation batches, on demand."""
    from metanet.zoo.data import streamed

    splits = {"train": streamed(task.train, "train"), "test": streamed(task.test, "test")}
    if task.val is not None:
        splits["val"] = streamed(task.val, "val")
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

    source = task.source if task.config.get("provider") == "signals" and task.source else task
    signals, where = {}, {}
    for s, name in ((0, "train"), (1, "test")):
        wanted = sorted({p.image_index for p in plans if p.split == s})
        if not wanted:
            continue
        size = source.split(name).num_samples
        bad = [i for i in wanted if not 0 <= i < size]
        if bad:
            raise ValueError(f"image {bad[0]} is outside split {s} ({size} signals)")
        # only this chunk's signals are read (a split larger than memory stays on disk)
        signals[s] = SignalData.from_task(task, name, rows=wanted)
        where[s] = {i: j for j, i in enumerate(wanted)}
    targets, labels = [], []
    for plan in plans:
        sig, j = signals[plan.split], where[plan.split][plan.image_index]
        targets.append(sig.values[j])
        known = (sig.labels is not None and sig.labels.dim() == 1
                 and not sig.labels.is_floating_point())  # fmt: skip
        labels.append(int(sig.labels[j]) if known else -1)
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
