"""``GeneratorDataModule``: one architecture of a zoo as flat, normalized (and canonicalized)
weight vectors with condition labels, for the weight generators of :mod:`metanet.tasks.generation`.

Set-up (``setup()``, once):

1. read every record of the chosen architecture (optionally only ``min_test_acc`` and above),
   hold out ``holdout`` whole runs (every checkpoint of a held-out run; seeded choice) as
   independent networks the generator never sees (the reference point of novelty: what a new
   run looks like), and keep at most ``max_networks`` of the rest (seeded choice);
2. canonicalize (``canonicalize=True``): align every network to a reference network (the best
   by ``val_acc`` when the zoo records a validation split, else by ``test_acc``, or the
   medoid) with Git Re-Basin weight matching; held-out networks are aligned to it too;
3. flatten to ``[N, D]`` (:meth:`WeightSpace.flatten` order) and standardize with per-layer
   (default) or per-parameter mean/std;
4. condition labels: the categories of a hyperparameter (``condition="task"`` of a
   :func:`metanet.generate.taskzoo.build_task_zoo` zoo, ``"optimizer"``, ...) or bins of a numeric
   one (``bins=[...]``). The vocabulary (sorted category names) is recorded in the generator's
   checkpoint.

Batches are ``(x [B, D], c [B])`` with ``c`` the condition index (0 when unconditional).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from metanet.generate.canonicalize import canonicalize as canonicalize_ws
from metanet.generate.canonicalize import pick_reference
from metanet.weightspace import WeightSpace, WeightSpaceSpec

__all__ = ["GeneratorDataModule", "ZooInputError", "layer_stats_vectors", "zoo_group_for"]

NORMALIZATIONS = ("layer", "param", "none")


class ZooInputError(ValueError):
    """A zoo that cannot feed the requested generator (several architectures and none chosen,
    too few networks or runs for the requested split, an unknown condition column)."""


def layer_stats_vectors(
    ws: WeightSpace, mode: str = "layer", eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-parameter ``(mean [D], std [D])`` in :meth:`WeightSpace.flatten` order.

    ``"layer"``: one mean/std per layer weight and per layer bias, broadcast over its entries;
    ``"param"``: every scalar its own mean/std over the batch; ``"none"``: zeros and ones.
    """
    if mode not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {mode!r}")
    flat = ws.flatten()
    if mode == "none":
        return torch.zeros(flat.shape[1]), torch.ones(flat.shape[1])
    if mode == "param":
        std = flat.std(0) if len(ws) > 1 else torch.ones(flat.shape[1])
        return flat.mean(0), std.clamp_min(eps) + eps
    means, stds = [], []
    for layer, w, b in zip(ws.spec.layers, ws.weights, ws.biases):
        parts = [w] + ([b] if layer.has_bias else [])
        for t in parts:
            n = t[0].numel()
            s = t.std() if t.numel() > 1 else torch.tensor(1.0)
            means.append(t.mean().expand(n))
            stds.append((s.clamp_min(eps) + eps).expand(n))
    return torch.cat(means).float(), torch.cat(stds).float()


def zoo_group_for(zoo: Any, arch: dict[str, Any]) -> Any:
    """The group of ``zoo`` (a path or zoo object) that holds networks of ``arch`` (a
    generator's target architecture), e.g. its training networks for novelty.

    Raises:
        ZooInputError: the zoo has no group of that architecture (the message names the zoo file,
            the architecture wanted and the ones it has).
    """
    from metanet.data.datamodules import open_zoo
    from metanet.zoo.architectures import arch_name

    z = open_zoo(zoo)
    where = os.fspath(getattr(z, "path", "") or "zoo")
    want = arch_name(dict(arch))
    names = list(z.architectures)
    for name in names:
        group = z[name]
        group_arch = getattr(group, "arch", None)
        if name == want or (group_arch and arch_name(dict(group_arch)) == want):
            if group.spec is None:
                break
            return group
    raise ZooInputError(
        f"{where}: no networks of the generator's architecture '{want}' (the zoo has {names})"
    )


def _condition_labels(
    values: np.ndarray, name: str, bins: Sequence[float] | None
) -> tuple[list[str], np.ndarray]:
    """Vocabulary and per-record label strings of a hyperparameter/metric column."""
    if values.dtype.kind in "US":
        labels = values.astype(str)
    elif bins is not None:
        edges = sorted(float(b) for b in bins)
        if not edges:
            raise ValueError(f"bins for condition '{name}' must not be empty")
        which = np.searchsorted(edges, values.astype(float), side="right")
        bounds = ["-inf", *[f"{e:g}" for e in edges], "inf"]
        names = [f"{name}[{bounds[i]},{bounds[i + 1]})" for i in range(len(edges) + 1)]
        labels = np.array([names[i] for i in which])
    else:
        numbers = values.astype(float)
        uniq = np.unique(numbers)
        if not np.all(numbers == np.round(numbers)) or len(uniq) > 32:
            raise ValueError(
                f"condition '{name}' is numeric with {len(uniq)} distinct non-category values: "
                "give bins=[...]"
            )
        labels = np.array([f"{name}={v:g}" for v in numbers])
    vocab = sorted(set(labels.tolist()))
    return vocab, labels


class GeneratorDataModule(L.LightningDataModule):
    """Networks of one architecture of a zoo as generator training data.

    Args:
        zoo: zoo file (metanet HDF5) or zoo object.
        arch: group name (default: the zoo's only weight-space architecture).
        condition: hyperparameter (or metric) whose categories condition the generator
            (``None``: unconditional).
        bins: bin edges for a numeric ``condition``.
        canonicalize: align every network to the reference with Git Re-Basin first.
        reference: ``"best"`` (highest val_acc, or test_acc when the zoo has no validation
            split), ``"medoid"`` or a record index.
        min_test_acc: keep only records with at least this test accuracy.
        holdout: runs held out of training (an int), or that share of the runs (a float in
            (0, 1)); 0: none.
        max_networks: keep at most this many training records (seeded random choice).
        normalize: ``"layer"`` (default), ``"param"`` or ``"none"`` standardization.
        batch_size: networks per batch.
        align_iter: coordinate-descent sweeps of weight matching.
        seed: seeds record choice, alignment order and shuffling.

    After ``setup()``: ``spec``, ``arch``, ``dim``, ``conditions`` (vocabulary), ``labels`` [N],
    ``vectors`` [N, D] (normalized), ``mean`` / ``std`` [D], ``reference_vector`` [D] (raw
    reference network), ``test_acc`` [N], ``run_ids`` [N], ``task_classes`` (condition -> digit
    classes, when the zoo records them), ``zoo_info`` (name, kind, data split); with a holdout
    also ``holdout_vectors`` [H, D] (raw units, aligned like the training networks when
    canonicalized), ``holdout_test_acc`` [H], ``holdout_run_ids`` [H], ``holdout_records`` [H].

    Raises (in ``setup``, :class:`ZooInputError`, one line naming the zoo file): a zoo of several
    weight-space architectures without ``arch``; fewer than 2 training networks left, or a holdout
    that leaves no run for training or asks for more runs than the zoo has; an unknown condition.
    """

    def __init__(
        self,
        zoo: Any,
        arch: str | None = None,
        condition: str | None = None,
        bins: list[float] | None = None,
        canonicalize: bool = True,
        reference: str | int = "best",
        min_test_acc: float | None = None,
        max_networks: int | None = None,
        normalize: str = "layer",
        holdout: int | float = 0,
        batch_size: int = 32,
        align_iter: int = 100,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(holdout, bool) or not (
            (isinstance(holdout, int) and holdout >= 0)
            or (isinstance(holdout, float) and 0.0 <= holdout < 1.0)
        ):
            raise ValueError(
                f"holdout must be a number of runs >= 0 or a fraction in [0, 1), got {holdout!r}"
            )
        if isinstance(reference, str) and reference not in ("best", "medoid"):
            raise ValueError(f"reference must be 'best', 'medoid' or an index, got {reference!r}")
        self.zoo = zoo
        self.arch_name = arch
        self.condition = condition
        self.bins = bins
        self.canonicalize = canonicalize
        self.reference = reference
        self.min_test_acc = min_test_acc
        self.max_networks = max_networks
        self.normalize = normalize
        self.holdout = holdout
        self.batch_size = batch_size
        self.align_iter = align_iter
        self.seed = seed
        self._ready = False

    # -- set-up ---------------------------------------------------------------------------------
    def _group(self, zoo: Any) -> Any:
        where = os.fspath(getattr(zoo, "path", "") or "zoo")
        names = list(zoo.architectures)
        if self.arch_name is not None:
            if self.arch_name not in names:
                raise ZooInputError(f"{where}: no architecture '{self.arch_name}'; it has {names}")
            group = zoo[self.arch_name]
        else:
            usable = [n for n in names if zoo[n].spec is not None]
            if len(usable) != 1:
                raise ZooInputError(
                    f"{where}: a generator models one architecture, and this zoo has "
                    f"{len(usable)} with a weight space {usable}: choose one with arch=..."
                )
            group = zoo[usable[0]]
        if group.spec is None:
            raise ZooInputError(
                f"{where}: architecture '{group.name}' has no weight space (norm/residual)"
            )
        return group

    def _split_holdout(
        self, keep: np.ndarray, runs: np.ndarray, where: str, group: str,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """``(train records, held-out records)`` of ``keep``: whole runs are held out."""
        if not self.holdout:
            return keep, keep[:0]
        uniq = np.unique(runs[keep])
        h = self.holdout
        count = int(round(h * len(uniq))) if isinstance(h, float) else int(h)
        if count < 1 or count >= len(uniq):
            raise ZooInputError(
                f"{where}: holdout={h!r} asks for {count} of the {len(uniq)} run(s) of "
                f"'{group}' ({len(keep)} networks); a holdout needs at least 1 run held out "
                "and 1 left for training"
            )
        held = rng.choice(uniq, count, replace=False)
        out = np.isin(runs[keep], held)
        return keep[~out], keep[out]

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        from metanet.data.datamodules import open_zoo

        zoo = open_zoo(self.zoo)
        where = os.fspath(getattr(zoo, "path", "") or "zoo")
        group = self._group(zoo)
        metrics = group.metrics
        n_all = len(group)
        keep = np.arange(n_all)
        acc = np.asarray(metrics["test_acc"], dtype=float)
        runs_all = np.asarray(metrics["run_id"]).astype(np.int64)
        if self.min_test_acc is not None:
            keep = keep[acc[keep] >= self.min_test_acc]
        rng = np.random.default_rng(self.seed)
        keep, held = self._split_holdout(keep, runs_all, where, group.name, rng)
        if self.max_networks is not None and len(keep) > self.max_networks:
            keep = np.sort(rng.choice(keep, self.max_networks, replace=False))
        if len(keep) < 2:
            raise ZooInputError(
                f"{where}: only {len(keep)} network(s) of '{group.name}' left for training "
                f"(of {n_all}; min_test_acc={self.min_test_acc}, holdout={self.holdout!r}, "
                f"max_networks={self.max_networks}); a generator needs at least 2"
            )
        ws = group.weight_space(keep).to(torch.float32)
        self.test_acc = torch.as_tensor(acc[keep], dtype=torch.float32)
        self.run_ids = torch.as_tensor(runs_all[keep])
        select = (
            np.asarray(metrics["val_acc"], dtype=float)
            if "val_acc" in metrics and np.isfinite(np.asarray(metrics["val_acc"], float)).all()
            else acc
        )

        # conditions
        self.task_classes: dict[str, list[int]] | None = None
        attrs = dict(getattr(zoo, "attrs", {}) or {})
        if self.condition is None:
            self.conditions: list[str] = []
            self.labels = torch.zeros(len(keep), dtype=torch.long)
        else:
            hp, mt = group.hparams, metrics
            if self.condition in hp:
                column = np.asarray(hp[self.condition])[keep]
            elif self.condition in mt:
                column = np.asarray(mt[self.condition])[keep]
            else:
                raise ZooInputError(
                    f"{where}: condition '{self.condition}' is neither a hyperparameter "
                    f"{sorted(hp)} nor a metric {sorted(mt)} of '{group.name}'"
                )
            self.conditions, labels = _condition_labels(column, self.condition, self.bins)
            index = {c: i for i, c in enumerate(self.conditions)}
            self.labels = torch.as_tensor([index[c] for c in labels], dtype=torch.long)
            tasks = attrs.get("tasks")
            if self.condition == "task" and isinstance(tasks, dict):
                self.task_classes = {
                    c: [int(k) for k in tasks[c]] for c in self.conditions if c in tasks
                }

        # canonicalization
        if isinstance(self.reference, int):
            if not 0 <= self.reference < n_all or self.reference not in set(keep.tolist()):
                raise ValueError(f"reference record {self.reference} is not among the kept ones")
            ref = int(np.searchsorted(keep, self.reference))
        elif self.reference == "best":
            ref = pick_reference(ws, torch.as_tensor(select[keep], dtype=torch.float32))
        else:
            ref = pick_reference(ws)
        if self.canonicalize:
            ws = canonicalize_ws(ws, ref, max_iter=self.align_iter, seed=self.seed)
        self.reference_index = int(keep[ref])
        self.holdout_records = torch.as_tensor(held)
        self.holdout_test_acc = torch.as_tensor(acc[held], dtype=torch.float32)
        self.holdout_run_ids = torch.as_tensor(runs_all[held])
        self.holdout_vectors = torch.zeros(0, ws.spec.num_params)
        if len(held):
            held_ws = group.weight_space(held).to(torch.float32)
            if self.canonicalize:
                held_ws = canonicalize_ws(
                    held_ws, ws[ref], max_iter=self.align_iter, seed=self.seed
                )
            self.holdout_vectors = held_ws.flatten()
        self.spec: WeightSpaceSpec = group.spec
        self.arch: dict = dict(group.arch)
        self.raw_vectors = ws.flatten()
        self.reference_vector = self.raw_vectors[ref].clone()
        self.mean, self.std = layer_stats_vectors(ws, self.normalize)
        self.vectors = (self.raw_vectors - self.mean) / self.std
        self.dim = int(self.vectors.shape[1])
        self.records = torch.as_tensor(keep)
        self.zoo_info = {
            "path": os.fspath(getattr(zoo, "path", "") or ""),
            "name": str(attrs.get("name", "")),
            "fingerprint": str(attrs.get("fingerprint", "")),
            "kind": str(attrs.get("kind", "")),
            "data": attrs.get("data") if isinstance(attrs.get("data"), dict) else None,
            "group": group.name,
        }
        self._ready = True

    # -- loaders --------------------------------------------------------------------------------
    def dataset(self) -> TensorDataset:
        """``(x [N, D], c [N])`` of every kept network."""
        if not self._ready:
            self.setup("fit")
        return TensorDataset(self.vectors, self.labels)

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.dataset(),
            batch_size=min(self.batch_size, len(self.vectors)),
            shuffle=True,
            drop_last=False,
            generator=gen,
        )
