"""Hypernetwork training tasks: ``GHNTask`` (graph hypernetwork over an architecture family) and
its data module ``GHNData``.

Each training batch holds a mini-batch of the task data (any provider of
:mod:`metanet.data.tasks`: the bundled digits, a ``Dataset`` class path, tensor files, an image
folder) and ``archs_per_batch`` architectures sampled from a family recipe
(:class:`metanet.hyper.family.ArchFamily`, which may list the user's own module classes; sizes
that follow from the data are filled in from it); the GHN predicts every parameter of
every architecture, each target network runs on the mini-batch with those parameters
(``torch.func.functional_call``) and the mean cross-entropy is backpropagated into the GHN.
Validation predicts the held-out architectures (and a fixed sample of the family) and reports
their accuracy with no training (``val/acc``, ``val/acc_held_out``) on the data's validation
split, or its test split when it has none (the bundled digits split has none).

Config (``configs/ghn/*.yaml``)::

    model: {class_path: metanet.tasks.hypernet.GHNTask,
            init_args: {ghn: {hidden: 64, decoder: lowrank, rank: 8}, lr: 1.0e-3}}
    data: {class_path: metanet.tasks.hypernet.GHNData,
           init_args: {recipe: datasets/ghn-digits-family.yaml, archs_per_batch: 4,
                       data: {provider: dataset, class_path: mypackage.data:Images}}}

Norm layers use batch statistics both in training and in validation (running statistics of a
network whose parameters change every step are meaningless; GHN papers do the same).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset

from metanet.data.tasks import LazyArray
from metanet.graph.arch import ArchGraph
from metanet.hyper.family import ArchFamily
from metanet.hyper.ghn import GHN
from metanet.zoo.architectures import arch_name, build_module, input_shape

__all__ = ["GHNData", "GHNTask", "MIPRegularizationTask", "TaskBatches", "arch_inputs"]


def arch_inputs(arch: dict[str, Any], x: Tensor) -> Tensor:
    """Inputs ``[N, *data shape]`` reshaped for ``arch`` (flat ``[N, C*H*W]`` for MLPs)."""
    return x.reshape(x.shape[0], *input_shape(arch))


def _identity(batch: Any) -> Any:
    return batch


def _rows(x: Tensor | LazyArray, idx: Tensor) -> Tensor:
    """``x[idx]`` of in-memory or streamed inputs (a streamed batch reads its rows from disk)."""
    return x[idx] if isinstance(x, Tensor) else x.take(idx)


def _chunks(x: Tensor | LazyArray) -> list[slice]:
    """The whole of in-memory inputs as one slice; streamed inputs in chunks that fit memory."""
    n = int(x.shape[0])
    if isinstance(x, Tensor):
        return [slice(0, n)]
    from metanet.zoo.data import stream_rows

    step = stream_rows(x)
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


def _check_batch(x: Tensor | LazyArray, rows: int, what: str) -> None:
    """One line when a batch of streamed inputs cannot fit in memory (nothing for tensors)."""
    if not isinstance(x, Tensor):
        from metanet.zoo.data import check_stream_batch

        check_stream_batch(rows, x, what)


class _TrainBatches(Dataset):
    """``length`` random batches: digits mini-batch + sampled archs (seeded per index/epoch);
    streamed inputs (:class:`~metanet.data.tasks.LazyArray`) read each batch's rows from disk."""

    def __init__(self, x: Tensor | LazyArray, y: Tensor, family: ArchFamily, batch_size: int,
                 archs_per_batch: int, length: int, seed: int) -> None:  # fmt: skip
        self.x, self.y, self.family = x, y, family
        self.batch_size, self.archs = batch_size, archs_per_batch
        self.length, self.seed = length, seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        key = (self.seed * 1_000_003 + self.epoch) * 1_000_003 + i
        g = torch.Generator().manual_seed(key)
        idx = torch.randint(0, self.x.shape[0], (self.batch_size,), generator=g)
        rng = random.Random(key)
        archs = [self.family.sample(rng) for _ in range(self.archs)]
        return {"x": _rows(self.x, idx), "y": self.y[idx], "archs": archs}


class _EvalBatches(Dataset):
    """One item per validated arch with the whole validation split (streamed inputs stay a
    :class:`~metanet.data.tasks.LazyArray`, which :meth:`GHNTask.validation_step` reads in
    chunks)."""

    def __init__(self, x: Tensor | LazyArray, y: Tensor, archs: list[dict], held: int) -> None:
        self.x, self.y, self.archs, self.held = x, y, archs, held

    def __len__(self) -> int:
        return len(self.archs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        held_out = i >= len(self.archs) - self.held
        return {"x": self.x, "y": self.y, "archs": [self.archs[i]], "held_out": held_out}


class GHNData(L.LightningDataModule):
    """Mini-batches of task data paired with architectures sampled from a family recipe.

    Args:
        recipe: path of the family YAML (``datasets/ghn-digits-family.yaml``).
        data: the task data (a provider name or mapping, :func:`metanet.data.tasks.load_task_data`;
            default the bundled digits). Its classes and input shape size the family's archs.
        batch_size: training samples per batch.
        archs_per_batch: architectures sampled per batch.
        steps_per_epoch: batches per epoch.
        val_family_archs: fixed family samples validated next to the held-out archs.
        seed: sampling seed.

    Splits larger than the memory limit stay on disk (:func:`metanet.zoo.data.streamed`): each
    training batch reads its rows, validation reads the split in chunks (norm layers then use
    each chunk's batch statistics instead of the whole split's).
    """

    def __init__(self, recipe: str = "datasets/ghn-digits-family.yaml",
                 data: dict[str, Any] | str = "digits", batch_size: int = 64,
                 archs_per_batch: int = 4, steps_per_epoch: int = 200,
                 val_family_archs: int = 4, seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        from metanet.data.tasks import load_task_data

        self.save_hyperparameters()
        self.task = load_task_data(data)
        if self.task.target_kind != "classes":
            raise ValueError(f"GHNData: data {self.task.name} has {self.task.target_kind} "
                             "targets; GHN training needs class labels")  # fmt: skip
        self.family = ArchFamily.from_yaml(recipe, task=self.task)
        self._train: _TrainBatches | None = None

    def setup(self, stage: str | None = None) -> None:
        from metanet.zoo.data import streamed

        hp, task = self.hparams, self.task
        x_tr, y_tr = streamed(task.train, "train")
        x_val, y_val = streamed(task.val if task.val is not None else task.test, "validation")
        _check_batch(x_tr, hp.batch_size, "one GHN training batch of the streamed data")
        _check_batch(x_val, 1, "one GHN validation chunk of the streamed data")
        self._train = _TrainBatches(x_tr, y_tr, self.family, hp.batch_size,
                                    hp.archs_per_batch, hp.steps_per_epoch, hp.seed)  # fmt: skip
        rng = random.Random(10_000 + hp.seed)
        fam = [self.family.sample(rng) for _ in range(hp.val_family_archs)]
        self._val = _EvalBatches(x_val, y_val, fam + self.family.held_out,
                                 len(self.family.held_out))  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        assert self._train is not None
        if self.trainer is not None:
            self._train.epoch = self.trainer.current_epoch
        return DataLoader(self._train, batch_size=None, shuffle=False, collate_fn=_identity)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._val, batch_size=None, shuffle=False, collate_fn=_identity)


class GHNTask(L.LightningModule):
    """Train a :class:`~metanet.hyper.ghn.GHN` on an architecture family (the task's loss).

    Args:
        ghn: keyword arguments of :class:`~metanet.hyper.ghn.GHN` (``hidden``, ``layers``,
            ``decoder``, ``rank``, ``max_dim``, ``chunk``, ``kernel``, ``max_dist``, ...).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        grad_clip: gradient-norm clip applied in ``configure_gradient_clipping`` (0: off).
        cache_size: traced architectures kept (module + prepared graph), LRU.
    """

    def __init__(self, ghn: dict[str, Any] | None = None, lr: float = 1e-3,
                 weight_decay: float = 1e-5, grad_clip: float = 5.0,
                 cache_size: int = 256) -> None:  # fmt: skip
        super().__init__()
        ghn = dict(ghn or {})
        self.ghn = GHN(**ghn)
        self.save_hyperparameters({"ghn": self.ghn.config, "lr": lr,
                                   "weight_decay": weight_decay, "grad_clip": grad_clip,
                                   "cache_size": cache_size})  # fmt: skip
        self._cache: OrderedDict[str, tuple[nn.Module, Any]] = OrderedDict()

    def _get(self, arch: dict[str, Any]) -> tuple[nn.Module, Any]:
        key = arch_name(arch)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        module = build_module(arch).to(self.device)
        example = torch.zeros(1, *input_shape(arch), device=self.device)
        prepared = self.ghn.prepare(ArchGraph.from_module(module, example), module)
        self._cache[key] = (module, prepared)
        while len(self._cache) > self.hparams.cache_size:
            self._cache.popitem(last=False)
        return module, prepared

    def forward_archs(self, archs: list[dict], x: Tensor) -> list[Tensor]:
        """Logits ``[N, classes]`` of every arch on inputs ``x [N, ...]`` with predicted params."""
        items = [self._get(a) for a in archs]
        params = self.ghn.predict_prepared([p for _, p in items])
        outs = []
        for arch, (module, _), p in zip(archs, items, params):
            module.train()  # batch statistics in norm layers
            outs.append(functional_call(module, p, (arch_inputs(arch, x),)))
        return outs

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        outs = self.forward_archs(batch["archs"], batch["x"])
        losses = torch.stack([F.cross_entropy(o, batch["y"]) for o in outs])
        acc = torch.stack([(o.argmax(-1) == batch["y"]).float().mean() for o in outs]).mean()
        loss = losses.mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["x"].shape[0])
        self.log("train/acc", acc, prog_bar=True, batch_size=batch["x"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x, y = batch["x"], batch["y"]
        if isinstance(x, Tensor):
            out = self.forward_archs(batch["archs"], x)[0]
            acc = (out.argmax(-1) == y).float().mean()
        else:  # streamed: the arch's parameters predicted once, the split read in chunks
            arch = batch["archs"][0]
            (module, prepared), correct = self._get(arch), torch.zeros((), device=self.device)
            params = self.ghn.predict_prepared([prepared])[0]
            module.train()  # batch statistics in norm layers (per chunk)
            for part in _chunks(x):
                xb = arch_inputs(arch, x[part].to(self.device))
                out = functional_call(module, params, (xb,))
                correct += (out.argmax(-1) == y[part]).sum()
            acc = correct / x.shape[0]
        self.log("val/acc", acc, prog_bar=True, batch_size=1)
        if batch.get("held_out"):
            self.log("val/acc_held_out", acc, batch_size=1)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:  # fmt: skip
        clip = gradient_clip_val or self.hparams.grad_clip
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.ghn.parameters(), lr=self.hparams.lr,
                                 weight_decay=self.hparams.weight_decay)  # fmt: skip


class _BatchSteps(Dataset):
    """``length`` random batches of ``(x, y)`` (seeded per index); streamed inputs read each
    batch's rows from disk."""

    def __init__(self, x: Tensor | LazyArray, y: Tensor, batch_size: int, length: int,
                 seed: int) -> None:  # fmt: skip
        self.x, self.y, self.batch_size, self.length, self.seed = x, y, batch_size, length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        idx = torch.randint(0, self.x.shape[0], (self.batch_size,), generator=g)
        return {"x": _rows(self.x, idx), "y": self.y[idx]}


class _Chunks(Dataset):
    """``(x, y)`` of a split as consecutive chunks (:func:`_chunks`): one batch in memory, or
    chunks of streamed inputs read from disk one at a time."""

    def __init__(self, x: Tensor | LazyArray, y: Tensor) -> None:
        self.x, self.y, self.parts = x, y, _chunks(x)

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        part = self.parts[i]
        return {"x": self.x[part], "y": self.y[part]}


class TaskBatches(L.LightningDataModule):
    """Random mini-batches of the task data (train) and its validation split (its test split
    when it has none), for :class:`MIPRegularizationTask`; inputs are flattened.

    Args:
        data: the task data (a provider name or mapping, default the bundled digits).
        batch_size, steps_per_epoch, seed: training batches.

    ``input_features`` and ``output_classes`` (from the data) are linked to the task's
    ``in_features`` and ``num_classes`` by ``metanet fit`` (:data:`metanet.cli.DATA_LINKS`).
    Splits larger than the memory limit stay on disk (:func:`metanet.zoo.data.streamed`): each
    training batch reads its rows, validation reads the split in chunks.
    """

    def __init__(self, data: dict[str, Any] | str = "digits", batch_size: int = 128,
                 steps_per_epoch: int = 200, seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        import math

        from metanet.data.tasks import load_task_data

        self.save_hyperparameters()
        self.task = load_task_data(data)
        if self.task.target_kind != "classes":
            raise ValueError(f"TaskBatches: data {self.task.name} has {self.task.target_kind} "
                             "targets, not classes")  # fmt: skip
        self.input_features = math.prod(self.task.input_shape)
        self.output_classes = int(self.task.num_classes)

    def setup(self, stage: str | None = None) -> None:
        from metanet.zoo.data import streamed

        task = self.task
        self.train_xy = streamed(task.train, "train")
        self.val_xy = streamed(task.val if task.val is not None else task.test, "validation")
        _check_batch(self.train_xy[0], self.hparams.batch_size,
                     "one MIP training batch of the streamed data")  # fmt: skip
        _check_batch(self.val_xy[0], 1, "one MIP validation chunk of the streamed data")

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        x, y = self.train_xy
        ds = _BatchSteps(x.flatten(1), y, hp.batch_size, hp.steps_per_epoch, hp.seed)
        return DataLoader(ds, batch_size=None, collate_fn=_identity)

    def val_dataloader(self) -> DataLoader:
        x, y = self.val_xy
        return DataLoader(_Chunks(x.flatten(1), y), batch_size=None, collate_fn=_identity)


class MIPRegularizationTask(L.LightningModule):
    """A hypernetwork conditioned on an L2 strength ``lam`` in [0, 1] writes a classifier MLP.

    Every step draws ``lam ~ U(0, 1)`` and minimises ``CE + lam * alpha * sum ||W||^2`` of the
    predicted weights (the task of ``scripts/bench_mip.py``). Validation logs test accuracy and
    cross-entropy at ``lam`` = 0, 0.5, 1 (``val/acc_lam0.5`` ...).

    Args:
        mip: MIP (``[z, 1-z]`` input + residual on ``W0``) or the plain hypernetwork.
        widths: hidden widths of the target MLP.
        in_features, num_classes: its inputs and outputs (linked from the data module by
            ``metanet fit``; digits: 64 and 10).
        hidden: hypernetwork hidden widths.
        alpha: L2 scale.
        lr: Adam learning rate.
    """

    def __init__(self, mip: bool = True, widths: list[int] | None = None,
                 hidden: list[int] | None = None, alpha: float = 1e-2,
                 lr: float = 1e-3, in_features: int = 64,
                 num_classes: int = 10) -> None:  # fmt: skip
        super().__init__()
        from metanet.hyper.mip import MIPHyperNetwork

        self.save_hyperparameters()
        target = build_module({"type": "mlp", "widths": list(widths or [64]), "in": in_features,
                               "out": num_classes})  # fmt: skip
        self.hnet = MIPHyperNetwork(target, cond_dim=1, hidden=tuple(hidden or (64, 64)), mip=mip)

    def _loss(self, lam: float, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        params = self.hnet(torch.tensor([lam], device=x.device))
        out = self.hnet.functional_call(params, x.flatten(1))
        ce = F.cross_entropy(out, y)
        reg = sum((v**2).sum() for k, v in params.items() if k.endswith("weight"))
        return ce, ce + lam * self.hparams.alpha * reg, (out.argmax(-1) == y).float().mean()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        lam = float(torch.rand(()))
        ce, loss, acc = self._loss(lam, batch["x"], batch["y"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["x"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        for lam in (0.0, 0.5, 1.0):
            ce, _, acc = self._loss(lam, batch["x"], batch["y"])
            # weighted by the chunk's size: the epoch's value is the whole split's mean
            self.log(f"val/acc_lam{lam:g}", acc, batch_size=batch["x"].shape[0])
            self.log(f"val/ce_lam{lam:g}", ce, batch_size=batch["x"].shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad],
                                lr=self.hparams.lr)  # fmt: skip
