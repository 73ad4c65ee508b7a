"""LightningDataModules over model zoos: WeightSpace batches and PyG batches of ParamGraphs.

Both modules read any zoo that satisfies :class:`metanet.data.zoo_protocol.ZooLike`: a metanet
HDF5 zoo (path or :class:`metanet.data.zoo_store.Zoo`) or a reader's
:class:`metanet.data.readers.InMemoryZoo`.

* Splits are by training run: every record (checkpoint) of one ``run_id`` lands in the same split,
  so no run leaks from train into val/test. The split is a seeded permutation of the runs.
* Targets: a metric column (``test_acc`` by default); regression targets are standardized with the
  train split's mean/std (:meth:`normalize_target` / :meth:`denormalize_target`), class targets
  (``label`` of INR zoos) are long tensors and :attr:`num_classes` is set.
* :attr:`weight_stats`: mean/std of each layer's weights and biases over the train split, for input
  normalization (``normalize_weights=True`` applies it to WeightSpace batches).
* :attr:`ParamGraphDataModule.graph_stats`: the per-type (and per type and depth) node/edge value
  statistics and degree histograms of the train split's graphs
  (:class:`metanet.nn.graph_features.GraphStats`) that the graph metanetworks standardize with;
  metanet's tasks hand them to the model before training.
* Sizes that follow from the data (:attr:`ParamGraphDataModule.node_in_dim` / ``edge_in_dim``)
  are attributes, linked to the model's arguments by ``metanet fit`` (see :mod:`metanet.cli`).
* ``canonicalize``: a weight-space map applied to every record as it is read (all splits, the
  statistics and the augmentations see its output; :class:`metanet.data.zoo_view.MappedZoo`),
  e.g. the sign-canonical form of sine / tanh networks.
* ``in_memory``: the selected groups' parameters are read once and batches index them in memory
  (:class:`metanet.data.zoo_view.PreloadedZoo`); by default (``"auto"``) when they fit in
  :data:`PRELOAD_AUTO_BYTES` and a quarter of the memory limit. Otherwise batches are read from
  the store one batch at a time (one HDF5 read per group per batch) by a ``BatchSampler``.
  ``num_workers > 0`` works either way (the HDF5 file is reopened in every worker).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from metanet.data.zoo_protocol import ZooGroupLike, ZooLike
from metanet.data.zoo_view import MappedZoo, PreloadedZoo, preload_bytes
from metanet.weightspace import WeightSpace

__all__ = ["LayerStats", "ParamGraphDataModule", "WeightSpaceDataModule", "open_zoo"]

SPLITS = ("train", "val", "test")
PRELOAD_AUTO_BYTES = 2 * 1024**3  # in_memory="auto" holds zoos up to this size in memory


def open_zoo(zoo: str | os.PathLike | ZooLike | ZooGroupLike) -> ZooLike:
    """A zoo object from a path (metanet HDF5 file or Small-CNN-Zoo folder), a zoo (returned
    as it is) or a single group (wrapped in an :class:`~metanet.data.readers.InMemoryZoo`)."""
    if isinstance(zoo, (str, os.PathLike)):
        path = os.fspath(zoo)
        if os.path.isdir(path):
            from metanet.data.readers import read_small_cnn_zoo

            return read_small_cnn_zoo(path)
        from metanet.data.zoo_store import Zoo

        return Zoo.open(path)
    if hasattr(zoo, "architectures") and hasattr(zoo, "__getitem__"):
        return zoo
    if hasattr(zoo, "metrics") and hasattr(zoo, "params"):  # a single group
        from metanet.data.readers import InMemoryZoo

        return InMemoryZoo([zoo], path=getattr(zoo, "path", ""))
    raise TypeError(f"expected a zoo path, Zoo or zoo group, got {type(zoo).__name__}")


@dataclass
class LayerStats:
    """Per-layer statistics of one architecture's weights over the train split.

    ``names[l]`` is the module path of layer ``l`` (state_dict keys ``names[l].weight`` and
    ``.bias``); every tensor is ``[L]``. Layers without a bias have bias mean 0 and std 1.
    """

    names: list[str]
    weight_mean: torch.Tensor
    weight_std: torch.Tensor
    bias_mean: torch.Tensor
    bias_std: torch.Tensor

    def normalize(self, ws: WeightSpace, eps: float = 1e-8) -> WeightSpace:
        """``(w - mean_l) / std_l`` per layer (biases alike) of a WeightSpace of this arch."""
        if len(ws.spec.layers) != len(self.names):
            raise ValueError(
                f"stats are for {len(self.names)} layers, ws has {len(ws.spec.layers)}"
            )
        weights = [
            (w - self.weight_mean[l].to(w)) / (self.weight_std[l].to(w) + eps)
            for l, w in enumerate(ws.weights)
        ]
        biases = []
        for l, (layer, b) in enumerate(zip(ws.spec.layers, ws.biases)):
            if layer.has_bias:
                b = (b - self.bias_mean[l].to(b)) / (self.bias_std[l].to(b) + eps)
            biases.append(b)
        return WeightSpace(ws.spec, weights, biases)


def _layer_names(group: ZooGroupLike) -> list[str]:
    if group.spec is not None:
        return [layer.name for layer in group.spec.layers]
    return [k[: -len(".weight")] for k in group.keys if k.endswith(".weight")]


def _compute_stats(group: ZooGroupLike, indices: np.ndarray, chunk: int = 512) -> LayerStats:
    names = _layer_names(group)
    n_l = len(names)
    acc = np.zeros((4, n_l, 3))  # [w/b, layer, (count, sum, sumsq)] (rows 2-3 unused)
    for start in range(0, len(indices), chunk):
        params = group.params(np.sort(indices[start : start + chunk]))
        for l, name in enumerate(names):
            for row, suffix in ((0, ".weight"), (1, ".bias")):
                t = params.get(f"{name}{suffix}" if name else suffix[1:])
                if t is None:
                    continue
                t = t.double()
                acc[row, l] += (t.numel(), float(t.sum()), float((t * t).sum()))
    mean = acc[:2, :, 1] / np.maximum(acc[:2, :, 0], 1)
    var = acc[:2, :, 2] / np.maximum(acc[:2, :, 0], 1) - mean**2
    std = np.sqrt(np.maximum(var, 0))
    std = np.where(acc[:2, :, 0] > 0, std, 1.0)
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return LayerStats(names, as_t(mean[0]), as_t(std[0]), as_t(mean[1]), as_t(std[1]))


def _identity(batch: Any) -> Any:
    return batch


@dataclass(frozen=True)
class _TargetNorm:
    """Picklable ``y -> (y - mean) / std`` (identity when disabled)."""

    mean: float
    std: float
    enabled: bool

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.mean) / self.std if self.enabled else y


class _ZooDataModule(L.LightningDataModule):
    """Shared split / target / statistics logic (see the module docstring)."""

    def __init__(
        self,
        zoo: Any,  # path | ZooLike | ZooGroupLike: Any, as LightningCLI parses this hint
        groups: str | Sequence[str] | None = None,
        target: str = "test_acc",
        task: str | None = None,
        splits: Sequence[float] = (0.8, 0.1, 0.1),
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
        normalize_target: bool = True,
        transforms: Callable | None = None,
        checkpoints: str | int = "all",
        stats_max_records: int | None = None,
        train_runs: int | None = None,
        canonicalize: Callable | None = None,
        in_memory: bool | str = "auto",
    ) -> None:
        super().__init__()
        if in_memory not in (True, False, "auto"):
            raise ValueError(f"in_memory must be true, false or 'auto', got {in_memory!r}")
        if train_runs is not None and train_runs < 1:
            raise ValueError(f"train_runs must be >= 1 (None: every train run), got {train_runs}")
        if task not in (None, "regression", "classification"):
            raise ValueError(f"task must be 'regression' or 'classification', got {task!r}")
        fractions = [float(f) for f in splits]
        if len(fractions) not in (2, 3) or any(f < 0 for f in fractions):
            raise ValueError(f"splits must be 2 or 3 non-negative fractions, got {splits}")
        if abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"splits must sum to 1, got {splits} (sum {sum(fractions)})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not (checkpoints in ("all", "last") or isinstance(checkpoints, int)):
            raise ValueError(f"checkpoints must be 'all', 'last' or an epoch, got {checkpoints!r}")
        self.zoo_source = zoo
        self.group_filter = [groups] if isinstance(groups, str) else groups
        self.target = target
        self.task = task or ("classification" if target == "label" else "regression")
        self.fractions = fractions + [0.0] * (3 - len(fractions))
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.normalize_target_flag = normalize_target and self.task == "regression"
        self.transforms = transforms
        self.checkpoints = checkpoints
        self.stats_max_records = stats_max_records
        self.train_runs = train_runs
        self.canonicalize = canonicalize
        self.in_memory = in_memory
        self.zoo: ZooLike | None = None
        self.group_names: list[str] = []
        self.splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.targets: dict[str, torch.Tensor] = {}
        self.target_mean = 0.0
        self.target_std = 1.0
        self.num_classes: int | None = None
        self._stats: dict[str, LayerStats] | None = None

    # -- which groups ------------------------------------------------------------------------
    def _select_groups(self, zoo: ZooLike) -> list[str]:
        names = list(zoo.architectures)
        if self.group_filter is None:
            return names
        unknown = [g for g in self.group_filter if g not in names]
        if unknown:
            raise KeyError(f"zoo has no architecture(s) {unknown}; has {names}")
        return list(self.group_filter)

    # -- setup -----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Open the zoo, split the runs, compute target normalization (idempotent)."""
        if self.zoo is not None:
            return
        zoo = open_zoo(self.zoo_source)
        if self.canonicalize is not None:  # every split, the statistics and the transforms
            zoo = MappedZoo(zoo, self.canonicalize)
        names = self._select_groups(zoo)
        if not names:
            raise ValueError("no architecture groups selected")
        if self._preload(zoo, names):
            zoo = PreloadedZoo(zoo)
        gid, rid, run_keys, ys = [], [], [], []
        for g_i, name in enumerate(names):
            group = zoo[name]
            metrics = group.metrics
            if self.target not in metrics:
                raise KeyError(
                    f"{getattr(zoo, 'path', '')}: group '{name}' has no metric '{self.target}'; "
                    f"has {sorted(metrics)}"
                )
            keep = self._keep(metrics, name)
            idx = np.flatnonzero(keep)
            run = metrics["run_id"][idx] if "run_id" in metrics else idx
            gid.append(np.full(len(idx), g_i, dtype=np.int64))
            rid.append(idx.astype(np.int64))
            run_keys += [(name, r) for r in np.asarray(run).tolist()]
            ys.append(np.asarray(metrics[self.target])[idx])
        gid_a, rid_a, y_all = np.concatenate(gid), np.concatenate(rid), np.concatenate(ys)
        if len(gid_a) == 0:
            raise ValueError("the selected zoo groups have no records")
        if self.task == "classification":
            if y_all.dtype.kind not in "iu" and not np.all(y_all == np.round(y_all)):
                raise ValueError(f"target '{self.target}' is not an integer class label")
            y_t = torch.as_tensor(y_all.astype(np.int64))
            self.num_classes = int(y_t.max()) + 1
        else:
            y_t = torch.as_tensor(y_all.astype(np.float64), dtype=torch.float32)
            if not torch.isfinite(y_t).all():
                bad = int((~torch.isfinite(y_t)).nonzero()[0])
                raise ValueError(
                    f"target '{self.target}' is NaN/inf for record {int(rid_a[bad])} of group "
                    f"'{names[int(gid_a[bad])]}'"
                )
        assignment = self._split_runs(run_keys)
        for s_i, split in enumerate(SPLITS):
            mask = assignment == s_i
            self.splits[split] = (gid_a[mask], rid_a[mask])
            self.targets[split] = y_t[torch.from_numpy(mask)]
        if self.task != "classification":
            self._check_targets_vary()
        if self.normalize_target_flag and len(self.targets["train"]) > 0:
            train = self.targets["train"].double()
            self.target_mean = float(train.mean())
            std = float(train.std(unbiased=False)) if len(train) > 1 else 0.0
            self.target_std = std if std > 1e-12 else 1.0
        self.group_names = names
        self.zoo = zoo
        self._check_groups()

    def _preload(self, zoo: ZooLike, names: Sequence[str]) -> bool:
        """Whether to hold the selected groups' parameters in memory (``in_memory``; ``"auto"``:
        when they are read from a file and take at most :data:`PRELOAD_AUTO_BYTES` and a quarter
        of metanet's memory limit)."""
        if self.in_memory != "auto":
            return bool(self.in_memory)
        from metanet.limits import memory_limit_bytes

        size = preload_bytes(zoo, names)
        return size is not None and size <= min(PRELOAD_AUTO_BYTES, memory_limit_bytes() // 4)

    def _check_groups(self) -> None:
        """Subclass hook: validate the selected groups."""

    def _keep(self, metrics: dict[str, np.ndarray], name: str) -> np.ndarray:
        n = len(next(iter(metrics.values())))
        if self.checkpoints == "all":
            return np.ones(n, dtype=bool)
        if "epoch" not in metrics:
            raise KeyError(f"group '{name}' has no 'epoch' metric to select checkpoints by")
        epoch = np.asarray(metrics["epoch"])
        if isinstance(self.checkpoints, int) and not isinstance(self.checkpoints, bool):
            return epoch == self.checkpoints
        run = np.asarray(metrics["run_id"]) if "run_id" in metrics else np.arange(n)
        last: dict[Any, Any] = {}
        for r, e in zip(run.tolist(), epoch.tolist()):
            last[r] = max(last.get(r, e), e)
        return np.array([e == last[r] for r, e in zip(run.tolist(), epoch.tolist())])

    def _check_targets_vary(self) -> None:
        """A regression target that is constant over a split cannot be learned (train) or
        ranked (val / test: Kendall's tau is undefined): refuse it by name."""
        for split, y in self.targets.items():
            if len(y) >= 2 and float(y.max() - y.min()) == 0.0:
                raise ValueError(
                    f"target '{self.target}' is constant ({float(y[0]):g}) over the {len(y)} "
                    f"records of the {split} split: nothing to learn or rank"
                )

    def _split_runs(self, run_keys: list[tuple[str, Any]]) -> np.ndarray:
        """Split index (0 train, 1 val, 2 test, -1 left out by ``train_runs``) per record; runs
        are never divided."""
        uniq = sorted(set(run_keys), key=lambda k: (k[0], str(k[1])))
        order = np.random.default_rng(self.seed).permutation(len(uniq))
        n = len(uniq)
        n_train = int(round(self.fractions[0] * n))
        n_val = int(round(self.fractions[1] * n))
        n_val = n - n_train if self.fractions[2] == 0.0 else min(n_val, n - n_train)
        counts = [n_train, n_val, n - n_train - n_val]
        wanted = [i for i, f in enumerate(self.fractions) if f > 0]
        if n < len(wanted):
            raise ValueError(
                f"the zoo has {n} runs, too few for splits {tuple(self.fractions)} (one run "
                f"each at least); add runs or change the split fractions"
            )
        for i in wanted:  # rounding left a requested split empty: it takes a run of the largest
            if counts[i] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] = 1
        n_train, n_val = counts[0], counts[1]
        split_of_run = np.empty(n, dtype=np.int64)
        split_of_run[order[:n_train]] = 0
        split_of_run[order[n_train : n_train + n_val]] = 1
        split_of_run[order[n_train + n_val :]] = 2
        if self.train_runs is not None:  # a learning-curve point: fewer train runs, same val/test
            if self.train_runs > n_train:
                raise ValueError(f"train_runs={self.train_runs}, but the train split has only "
                                 f"{n_train} runs")  # fmt: skip
            split_of_run[order[self.train_runs : n_train]] = -1  # left out
        position = {k: i for i, k in enumerate(uniq)}
        return np.array([split_of_run[position[k]] for k in run_keys], dtype=np.int64)

    # -- targets ---------------------------------------------------------------------------
    def normalize_target(self, y: torch.Tensor) -> torch.Tensor:
        """Raw metric values -> the standardized targets the loaders yield."""
        return self._target_norm()(y)

    def _target_norm(self) -> _TargetNorm:
        return _TargetNorm(self.target_mean, self.target_std, self.normalize_target_flag)

    def denormalize_target(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize_target` (model outputs -> metric units)."""
        if not self.normalize_target_flag:
            return y
        return y * self.target_std + self.target_mean

    # -- statistics ------------------------------------------------------------------------
    def _group_stats(self) -> dict[str, LayerStats]:
        if self._stats is None:
            self.setup()
            gid, rid = self.splits["train"]
            stats = {}
            rng = np.random.default_rng(self.seed)
            for g_i, name in enumerate(self.group_names):
                idx = rid[gid == g_i]
                if idx.size == 0:
                    idx = np.concatenate([r[g == g_i] for g, r in self.splits.values()])
                cap = self.stats_max_records
                if cap is not None and idx.size > cap:
                    idx = rng.choice(idx, size=cap, replace=False)
                stats[name] = _compute_stats(self.zoo[name], idx)
            self._stats = stats
        return self._stats

    # -- loaders ---------------------------------------------------------------------------
    def _dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        ds = self._dataset(split)
        if shuffle:
            gen = torch.Generator().manual_seed(self.seed)
            base = RandomSampler(range(len(ds)), generator=gen)
        else:
            base = SequentialSampler(range(len(ds)))
        return DataLoader(
            ds,
            sampler=BatchSampler(base, self.batch_size, drop_last=False),
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def split_run_ids(self, split: str) -> set[tuple[str, Any]]:
        """``(group, run_id)`` of every run in ``split`` (for leak checks and reports)."""
        self.setup()
        gid, rid = self.splits[split]
        out = set()
        for g_i, r in zip(gid.tolist(), rid.tolist()):
            name = self.group_names[g_i]
            metrics = self.zoo[name].metrics
            out.add((name, metrics["run_id"][r].item() if "run_id" in metrics else r))
        return out


# ------------------------------------------------------------------------------------------------
# WeightSpace batches
# ------------------------------------------------------------------------------------------------
class _WeightSpaceBatches(Dataset):
    """Item = a list of positions; returns ``(WeightSpace [k], target [k])`` read in one go."""

    def __init__(self, zoo, name, records, targets, transform, stats, normalize_target) -> None:
        self.zoo, self.name, self.records, self.targets = zoo, name, records, targets
        self.transform, self.stats, self.normalize_target = transform, stats, normalize_target

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, positions: list[int]) -> tuple[WeightSpace, torch.Tensor]:
        pos = np.asarray(positions, dtype=np.int64)
        ws = self.zoo[self.name].weight_space(self.records[pos])
        y = self.normalize_target(self.targets[torch.from_numpy(pos)])
        if self.transform is not None:
            ws, y = self.transform(ws, y)
        if self.stats is not None:
            ws = self.stats.normalize(ws)
        return ws, y


class WeightSpaceDataModule(_ZooDataModule):
    """Batches ``(WeightSpace [B], target [B])`` of one architecture group of a zoo.

    Args:
        zoo: zoo path (HDF5 file, or Small-CNN-Zoo folder), ``Zoo``, ``InMemoryZoo`` or a group.
        group: architecture group (default: the zoo's only group with a weight space).
        target: metric to predict (``test_acc``; ``label`` for INR classification).
        task: ``"regression"`` or ``"classification"`` (default: classification for ``label``).
        splits: train/val(/test) fractions of the training runs (sum 1); rounding never leaves
            a split with a fraction above 0 without a run, and a zoo with fewer runs than
            splits is an error.
        seed: seeds the split and the shuffling.
        batch_size, num_workers: DataLoader settings.
        normalize_target: standardize regression targets with the train split's mean/std.
        transforms: a weight-space transform ``(ws, y) -> (ws, y)`` for training batches
            (:mod:`metanet.weightspace.augment`).
        normalize_weights: standardize every layer with :attr:`weight_stats` (after transforms).
        checkpoints: ``"all"`` records, the ``"last"`` of every run, or one epoch (int).
        stats_max_records: compute :attr:`weight_stats` on at most this many train records.
        train_runs: train on the first this many runs of the train split only (a seeded
            subset; validation and test keep every run of theirs): points of a learning curve
            over zoo size that share one test set.
        canonicalize: a map ``WeightSpace -> WeightSpace`` applied to every record of every
            split as it is read, before statistics and ``transforms``
            (:class:`~metanet.data.zoo_view.MappedZoo`), e.g.
            :func:`metanet.weightspace.symmetry.sign_canonical` for sine / tanh zoos (in YAML:
            ``canonicalize: metanet.weightspace.symmetry.sign_canonical``).
        in_memory: hold the selected groups' parameters in memory once read (``true``), read
            every batch from the store (``false``), or decide by size (``"auto"``, see the
            module docstring). Batches are the same either way.
    """

    def __init__(
        self,
        zoo: Any,  # path | ZooLike | ZooGroupLike: Any, as LightningCLI parses this hint
        group: str | None = None,
        target: str = "test_acc",
        task: str | None = None,
        splits: Sequence[float] = (0.8, 0.1, 0.1),
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
        normalize_target: bool = True,
        transforms: Callable | None = None,
        normalize_weights: bool = False,
        checkpoints: str | int = "all",
        stats_max_records: int | None = None,
        train_runs: int | None = None,
        canonicalize: Callable | None = None,
        in_memory: bool | str = "auto",
    ) -> None:
        super().__init__(
            zoo, group, target, task, splits, seed, batch_size, num_workers, normalize_target,
            transforms, checkpoints, stats_max_records, train_runs, canonicalize,
            in_memory,
        )  # fmt: skip
        self.group = group
        self.normalize_weights = normalize_weights

    def _select_groups(self, zoo: ZooLike) -> list[str]:
        if self.group is not None:
            return super()._select_groups(zoo)
        with_ws = [n for n in zoo.architectures if zoo[n].spec is not None]
        if len(with_ws) != 1:
            raise ValueError(
                f"zoo {getattr(zoo, 'path', '')} has {len(with_ws)} architecture groups with a "
                f"weight space ({with_ws}); pass group="
            )
        return with_ws

    def _check_groups(self) -> None:
        (name,) = self.group_names
        if self.zoo[name].spec is None:
            raise ValueError(
                f"group '{name}' has no weight space (norm layers / residual blocks); use "
                "ParamGraphDataModule"
            )
        self.group = name

    @property
    def spec(self):
        """The :class:`WeightSpaceSpec` of the batches."""
        self.setup()
        return self.zoo[self.group].spec

    @property
    def weight_stats(self) -> LayerStats:
        """Per-layer mean/std of weights and biases over the train split."""
        return self._group_stats()[self.group]

    def _dataset(self, split: str) -> Dataset:
        _, rid = self.splits[split]
        return _WeightSpaceBatches(
            self.zoo,
            self.group,
            rid,
            self.targets[split],
            self.transforms if split == "train" else None,
            self.weight_stats if self.normalize_weights else None,
            self._target_norm(),
        )

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int):
        """Move ``(WeightSpace, target)`` batches with :meth:`WeightSpace.to` (tensors only; the
        spec is shared, not copied)."""
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], WeightSpace):
            return (batch[0].to(device), *(b.to(device) for b in batch[1:]))
        return super().transfer_batch_to_device(batch, device, dataloader_idx)


# ------------------------------------------------------------------------------------------------
# ParamGraph batches
# ------------------------------------------------------------------------------------------------
def _example_input(group: ZooGroupLike) -> torch.Tensor | None:
    shape = getattr(group, "input_shape", None)
    if shape is None and isinstance(getattr(group, "arch", None), dict):
        from metanet.zoo.architectures import input_shape

        shape = input_shape(group.arch)
    return torch.zeros(1, *shape) if shape is not None else None


def _trace_template(group: ZooGroupLike, max_kernel_size: int):
    """The ParamGraph of a group's first record: the structure every record of it shares."""
    from metanet.graph import from_module

    return from_module(group.module(0), _example_input(group), max_kernel_size=max_kernel_size)


def _stacked_values(template: Any, params: dict[str, torch.Tensor], name: str):
    """Node and edge values ``x [k, N, F]``, ``edge_attr [k, E, K]`` of ``k`` records of one
    architecture (stacked state_dict tensors ``params``), as ``template.with_state_dict`` lays
    them out for each record."""
    layout = template.layout
    k = len(next(iter(params.values())))
    x = template.x.unsqueeze(0).repeat(k, 1, 1)
    edge_attr = template.edge_attr.unsqueeze(0).repeat(k, 1, 1)
    for key, slot in layout.slots.items():
        value = params.get(key)
        if value is None:
            raise ValueError(f"group '{name}': the records have no parameter '{key}'")
        if tuple(value.shape[1:]) != slot.shape:
            raise ValueError(
                f"group '{name}': '{key}' has shape {tuple(value.shape[1:])}, its graph expects "
                f"{slot.shape}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"group '{name}': parameter '{key}' has NaN/inf values")
        dst = edge_attr if slot.source == "edge" else x
        dst[:, slot.rows, slot.col : slot.col + slot.width] = value.reshape(k, -1, slot.width).to(
            dst.dtype
        )
    return x, edge_attr


class _GraphBatches(Dataset):
    """Item = a list of positions; returns ``(torch_geometric Batch, target [k])``.

    The graph structure of every architecture is traced once per process (from the group's first
    record) and reused: later records only swap the values (``ParamGraph.with_state_dict``). A
    batch of ``k`` records of one architecture (every batch of a one-group zoo) goes faster: the
    collated structure of ``k`` copies of the graph is built once and each batch only writes its
    values into it (:func:`_stacked_values`); the result equals ``Batch.from_data_list``'s.
    """

    def __init__(
        self, zoo, names, gid, rid, targets, transform, normalize_target, max_kernel_size=9
    ) -> None:  # fmt: skip
        self.zoo, self.names, self.gid, self.rid, self.targets = zoo, names, gid, rid, targets
        self.transform, self.normalize_target = transform, normalize_target
        self.max_kernel_size = max_kernel_size
        self._templates: dict[str, Any] = {}
        self._collated: dict[tuple[str, int], Any] = {}  # (group, k) -> Batch of k templates
        self._warned = False

    def __len__(self) -> int:
        return len(self.rid)

    def template(self, name: str):
        if name not in self._templates:
            self._templates[name] = _trace_template(self.zoo[name], self.max_kernel_size)
        return self._templates[name]

    def __getitem__(self, positions: list[int]):
        from torch_geometric.data import Batch

        pos = np.asarray(positions, dtype=np.int64)
        y = self.normalize_target(self.targets[torch.from_numpy(pos)])
        graphs: list[Any] = [None] * len(pos)
        y_out: list[Any] = [None] * len(pos)
        gids = self.gid[pos]
        for g_i in np.unique(gids):
            where = np.flatnonzero(gids == g_i)
            name = self.names[int(g_i)]
            group = self.zoo[name]
            params = group.params(self.rid[pos[where]])
            y_sub = y[torch.from_numpy(where)]
            if self.transform is not None:
                if group.spec is not None:
                    ws, y_sub = self.transform(group.weight_space(self.rid[pos[where]]), y_sub)
                    params = {**params, **ws.stacked_params()}
                elif not self._warned:
                    warnings.warn(
                        f"group '{name}' has no weight space: its graphs are not augmented",
                        stacklevel=2,
                    )
                    self._warned = True
            template = self.template(name)
            if len(where) == len(pos):  # one architecture: write the values into its structure
                return self._one_group_batch(name, template, params), y_sub
            for j, w in enumerate(where.tolist()):
                graphs[w] = template.with_state_dict({k: v[j] for k, v in params.items()})
                y_out[w] = y_sub[j]
        return Batch.from_data_list(graphs), torch.stack(y_out)

    def _one_group_batch(self, name: str, template: Any, params: dict[str, torch.Tensor]):
        """The PyG Batch of ``k`` records of group ``name`` (stacked ``params``): a shallow copy
        of the cached collated structure with new ``x`` / ``edge_attr``."""
        import copy

        from torch_geometric.data import Batch

        k = len(next(iter(params.values())))
        key = (name, k)
        if key not in self._collated:
            self._collated[key] = Batch.from_data_list([template] * k)
        x, edge_attr = _stacked_values(template, params, name)
        batch = copy.copy(self._collated[key])
        batch.x = x.reshape(-1, x.size(-1))
        batch.edge_attr = edge_attr.reshape(-1, edge_attr.size(-1))
        return batch


class ParamGraphDataModule(_ZooDataModule):
    """Batches ``(torch_geometric Batch of ParamGraphs, target [B])`` over architecture groups.

    Graphs of different architectures are mixed in one batch. Arguments as for
    :class:`WeightSpaceDataModule`, except ``groups`` (default: all groups of the zoo);
    ``transforms`` are weight-space transforms applied to the groups that have a weight space;
    ``max_kernel_size``: conv kernel elements per edge (``edge_attr`` width, 9 = 3x3; 25 reads
    5x5 kernels), passed to :func:`metanet.graph.from_module` and to the graph model as
    ``edge_in_dim``.

    :attr:`graph_stats` are the statistics of the train split's graphs the graph models need
    (value standardization per type and per type and depth, PNA degrees). They are computed
    once, on first use, from every training record, or with ``stats_max_records`` from at most
    that many training records per architecture group (a sample drawn with ``seed``; degree
    statistics always count every training record, since all records of a group share one graph
    structure). Validation and test records never enter them, and ``transforms`` are not
    applied.
    """

    def __init__(
        self,
        zoo: Any,  # path | ZooLike | ZooGroupLike: Any, as LightningCLI parses this hint
        groups: str | Sequence[str] | None = None,
        target: str = "test_acc",
        task: str | None = None,
        splits: Sequence[float] = (0.8, 0.1, 0.1),
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
        normalize_target: bool = True,
        transforms: Callable | None = None,
        checkpoints: str | int = "all",
        stats_max_records: int | None = None,
        max_kernel_size: int = 9,
        train_runs: int | None = None,
        canonicalize: Callable | None = None,
        in_memory: bool | str = "auto",
    ) -> None:
        if max_kernel_size < 1:
            raise ValueError(f"max_kernel_size must be >= 1, got {max_kernel_size}")
        self.max_kernel_size = max_kernel_size
        super().__init__(
            zoo, groups, target, task, splits, seed, batch_size, num_workers, normalize_target,
            transforms, checkpoints, stats_max_records, train_runs, canonicalize,
            in_memory,
        )  # fmt: skip
        self._graph_stats: Any = None
        self._graph_stats_done = False

    @property
    def node_in_dim(self) -> int:
        """Width of the graphs' ``x`` (the graph model's ``node_in_dim``)."""
        from metanet.graph.paramgraph import NODE_FEATURES

        return len(NODE_FEATURES)

    @property
    def edge_in_dim(self) -> int:
        """Width of the graphs' ``edge_attr`` (the graph model's ``edge_in_dim``)."""
        return self.max_kernel_size

    @property
    def graph_stats(self) -> Any:
        """:class:`~metanet.nn.graph_features.GraphStats` of the train split's graphs (see the
        class docstring), or ``None`` when the train split is empty. Computed on first use
        (this calls :meth:`setup`) and cached."""
        if not self._graph_stats_done:
            self.setup()
            self._graph_stats = self._compute_graph_stats()
            self._graph_stats_done = True
        return self._graph_stats

    def _compute_graph_stats(self) -> Any:
        from metanet.nn.graph_features import GraphStatsAccumulator

        gid, rid = self.splits["train"]
        if rid.size == 0:
            return None
        acc = GraphStatsAccumulator(self.node_in_dim, self.edge_in_dim)
        rng = np.random.default_rng(self.seed)
        for g_i, name in enumerate(self.group_names):
            idx = rid[gid == g_i]
            if idx.size == 0:
                continue
            group = self.zoo[name]
            template = _trace_template(group, self.max_kernel_size)
            n, e = template.num_nodes, template.edge_index.size(1)
            edge_layer = template.node_layer[template.edge_index[1].long()]
            in_deg = torch.bincount(template.edge_index[1], minlength=n)
            out_deg = torch.bincount(template.edge_index[0], minlength=n)
            acc.add_degrees(in_deg, out_deg, repeats=idx.size)
            cap = self.stats_max_records
            if cap is not None and idx.size > cap:
                idx = rng.choice(idx, size=cap, replace=False)
            idx = np.sort(idx)
            per_record = n * template.x.size(1) + e * template.edge_attr.size(1)
            chunk = max(1, min(256, (1 << 22) // max(per_record, 1)))
            for start in range(0, idx.size, chunk):
                params = group.params(idx[start : start + chunk])
                x, edge_attr = _stacked_values(template, params, name)
                acc.add_values(x, template.node_type, edge_attr, template.edge_type,
                               node_layer=template.node_layer, edge_layer=edge_layer)  # fmt: skip
        return acc.result()

    @property
    def weight_stats(self) -> dict[str, LayerStats]:
        """Per group: per-layer mean/std of weights and biases over the train split."""
        return self._group_stats()

    def _dataset(self, split: str) -> Dataset:
        gid, rid = self.splits[split]
        return _GraphBatches(
            self.zoo,
            self.group_names,
            gid,
            rid,
            self.targets[split],
            self.transforms if split == "train" else None,
            self._target_norm(),
            self.max_kernel_size,
        )
