"""``GeneratorDataModule``: one architecture of a zoo as flat, normalized (and canonicalized)
weight vectors with condition labels, for the weight generators of :mod:`metanet.tasks.generation`.

Two layouts of a network as a vector:

* a *weight space* (:meth:`WeightSpace.flatten` order), for plain chains of Linear/Conv layers
  (MLPs, CNNs without norm layers, SIRENs): canonicalization by Git Re-Basin is available;
* a *flat parameter layout* (:class:`FlatLayout`), for any module family (CNNs with BatchNorm,
  residual blocks, a user ``class_path`` module): every parameter of ``build_module(arch)`` in
  ``named_parameters()`` order. Chains with BatchNorm (no residual blocks, no user module) are
  canonicalized too (:func:`metanet.generate.canonicalize.canonicalize_params`: the BatchNorm
  weights, biases and running statistics move with their conv channels). Buffers (BatchNorm
  running statistics) are not generated: the layout holds the zoo's average as defaults, and
  the evaluation can recompute them on a few training batches after generation
  (:func:`metanet.generate.evaluate.classifier_accuracy`, ``metanet generate --calibrate-bn K``).
  The layout travels in the generator's checkpoint as ``info["layout"]``
  (:func:`network_layout` reads it back; checkpoints written before it had its own key carry it
  as ``info["zoo_info"]["layout"]``, which is read too).

Set-up (``setup()``, once):

1. read every record of the chosen architecture (optionally only ``min_test_acc`` and above),
   hold out ``holdout`` whole runs (every checkpoint of a held-out run; seeded choice) as
   independent networks the generator never sees (the reference point of novelty: what a new
   run looks like), and keep at most ``max_networks`` of the rest (seeded choice);
2. canonicalize (``canonicalize=True``): align every network to a reference network (the best
   by ``val_acc`` when the zoo records a validation split, else by ``test_acc``, or the
   medoid) with Git Re-Basin weight matching; held-out networks are aligned to it too. For a
   flat layout the whole state dict is aligned (BatchNorm affine parameters in the matching
   objective, running statistics permuted with their channels) and the layout's default
   buffers are the average of the *aligned* running statistics;
3. flatten to ``[N, D]`` (:meth:`WeightSpace.flatten` order) and standardize with per-layer
   (default) or per-parameter mean/std;
4. condition labels: the categories of a hyperparameter (``condition="task"`` of a
   :func:`metanet.generate.taskzoo.build_task_zoo` zoo, ``"optimizer"``, ...) or bins of a numeric
   one (``bins=[...]``). The vocabulary (sorted category names) is recorded in the generator's
   checkpoint.

Batches are ``(x [B, D], c [B])`` with ``c`` the condition index (0 when unconditional).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from metanet.generate.canonicalize import ChannelPermutations, canonicalize_params, pick_reference
from metanet.generate.canonicalize import canonicalize as canonicalize_ws
from metanet.weightspace import WeightSpace, WeightSpaceSpec
from metanet.weightspace.spec import LayerSpec, WeightSpaceError

__all__ = ["FlatLayout", "GeneratorDataModule", "ZooInputError", "layer_stats_vectors",
           "network_layout", "zoo_group_for"]  # fmt: skip

NORMALIZATIONS = ("layer", "param", "none")
LAYOUTS = ("auto", "weightspace", "flat")


class ZooInputError(ValueError):
    """A zoo that cannot feed the requested generator (several architectures and none chosen,
    too few networks or runs for the requested split, an unknown condition column)."""


@dataclass
class FlatLayout:
    """A network of any module family as one flat parameter vector, and back.

    The vector is every parameter of the module in ``named_parameters()`` order, each flattened
    (conv kernels, BatchNorm weights and biases, Linear weights ...). Buffers (BatchNorm
    ``running_mean`` / ``running_var`` / ``num_batches_tracked``) are not part of it: ``buffers``
    holds the values every network is loaded with (the zoo's average running statistics, see
    :class:`GeneratorDataModule`), to be recalibrated after loading
    (:func:`metanet.hyper.calibrate.calibrate_batchnorm`).

    To the generators a layout looks like a weight space of one pseudo-layer per parameter tensor
    (:meth:`spec`: shape ``[numel, 1]``, no bias, no permutation), so normalization ("layer":
    one mean/std per parameter tensor), sampling and the baselines work unchanged; only loading
    into the module goes through :meth:`load_into`.

    Attributes:
        params: ``(state_dict key, shape)`` of every generated parameter, in vector order.
        buffers: state_dict key -> value of every persistent buffer.
    """

    params: tuple[tuple[str, tuple[int, ...]], ...]
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_module(
        cls, module: nn.Module, buffers: Mapping[str, torch.Tensor] | None = None
    ) -> FlatLayout:
        """The layout of ``module``'s parameters; buffer defaults from ``buffers`` (keys of the
        module's persistent buffers; missing ones: the module's own values)."""
        params = tuple((k, tuple(int(s) for s in p.shape)) for k, p in module.named_parameters())
        if not params:
            raise ValueError(f"{type(module).__name__} has no parameters to generate")
        names = {k for k, _ in params}
        own = {k: v for k, v in module.state_dict().items() if k not in names}
        given = dict(buffers or {})
        return cls(params, {k: given.get(k, v).detach().clone().cpu() for k, v in own.items()})

    @property
    def dim(self) -> int:
        """Scalars per network vector."""
        return sum(math.prod(shape) for _, shape in self.params)

    @property
    def keys(self) -> list[str]:
        """State_dict keys of the generated parameters, in vector order."""
        return [k for k, _ in self.params]

    def spec(self) -> WeightSpaceSpec:
        """The pseudo weight space the generators see: one ``[numel, 1]`` layer per parameter
        tensor (named ``flat:<key>``), no biases, no permutations."""
        layers = tuple(
            LayerSpec(name=f"flat:{k}", kind="linear", weight_shape=(math.prod(s), 1),
                      has_bias=False)
            for k, s in self.params
        )  # fmt: skip
        return WeightSpaceSpec(layers)

    def flatten(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[N, D]`` vectors of stacked parameters ``{key: [N, *shape]}`` (e.g.
        ``ZooGroup.params(indices)``; other keys are ignored).

        Raises:
            ValueError: a parameter of the layout is missing or has another shape.
        """
        parts = []
        for key, shape in self.params:
            if key not in params:
                raise ValueError(f"flat layout: no parameter '{key}' (got {sorted(params)})")
            t = params[key]
            if tuple(t.shape[1:]) != shape:
                raise ValueError(f"flat layout: '{key}' is {tuple(t.shape[1:])}, expected {shape}")
            parts.append(t.reshape(t.shape[0], -1).float())
        return torch.cat(parts, dim=1)

    def unflatten(self, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stacked parameters ``{key: [N, *shape]}`` of ``[N, D]`` vectors (no buffers)."""
        if vectors.dim() != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"flat layout: expected vectors [N, {self.dim}], got "
                             f"{tuple(vectors.shape)}")  # fmt: skip
        out, offset = {}, 0
        for key, shape in self.params:
            n = math.prod(shape)
            out[key] = vectors[:, offset : offset + n].reshape(len(vectors), *shape)
            offset += n
        return out

    def canonicalize(
        self, vectors: torch.Tensor, structure: ChannelPermutations, reference: torch.Tensor,
        max_iter: int = 100, seed: int = 0,
    ) -> torch.Tensor:  # fmt: skip
        """``[N, D]`` network vectors with their hidden channels permuted into the frame of the
        ``reference`` vector ``[D]`` (Git Re-Basin weight matching with the BatchNorm weights and
        biases in the objective; :func:`metanet.generate.canonicalize.canonicalize_params`).

        Vectors hold parameters only: loaded with buffers that are the same for every network
        (the layout's, or recalibrated ones) each computes the same function as before. Rows
        with NaN/inf values are returned unchanged.

        Args:
            vectors: ``[N, D]`` in this layout.
            structure: ``ChannelPermutations.from_module`` of the layout's module.
            reference: ``[D]`` the network every vector is aligned to.
            max_iter, seed: passed to the weight matching.
        """
        if reference.shape != (self.dim,):
            raise ValueError(f"flat layout: reference must be [{self.dim}], got "
                             f"{tuple(reference.shape)}")  # fmt: skip
        out = vectors.clone()
        rows = torch.isfinite(vectors).all(1).nonzero().flatten()
        if len(rows) and torch.isfinite(reference).all():
            params = self.unflatten(vectors[rows])
            ref = self.unflatten(reference.reshape(1, -1))
            out[rows] = self.flatten(
                canonicalize_params(params, structure, ref, max_iter=max_iter, seed=seed)
            ).to(out.dtype)
        return out

    def state_dict(
        self, vector: torch.Tensor, buffers: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The full state_dict of one network vector ``[D]``: its parameters and the layout's
        buffers (or ``buffers``, e.g. a network's own trained running statistics)."""
        params = {k: v[0].clone() for k, v in self.unflatten(vector.reshape(1, -1)).items()}
        src = self.buffers if buffers is None else buffers
        return {**params, **{k: src[k].clone() for k in self.buffers}}

    def load_into(
        self, module: nn.Module, vector: torch.Tensor,
        buffers: Mapping[str, torch.Tensor] | None = None,
    ) -> nn.Module:  # fmt: skip
        """Copy one network vector ``[D]`` (and the buffer defaults, or ``buffers``) into
        ``module`` in place; returns the module.

        Raises:
            ValueError: ``module`` does not have this layout's parameters and buffers.
        """
        sd = self.state_dict(vector.detach().to(torch.float32).cpu(), buffers)
        try:
            module.load_state_dict(sd, strict=True)
        except RuntimeError as err:
            first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
            raise ValueError(f"{type(module).__name__} does not fit this flat layout: "
                             f"{first}") from None  # fmt: skip
        return module

    def to_dict(self) -> dict[str, Any]:
        """Plain python (for checkpoints): keys, shapes and buffer values."""
        return {
            "params": [[k, list(s)] for k, s in self.params],
            "buffers": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""),
                            "values": v.reshape(-1).tolist()} for k, v in self.buffers.items()},
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FlatLayout:
        """Inverse of :meth:`to_dict`."""
        try:
            params = tuple((str(k), tuple(int(x) for x in s)) for k, s in data["params"])
            buffers = {
                str(k): torch.tensor(b["values"], dtype=getattr(torch, b["dtype"])).reshape(
                    b["shape"]
                )
                for k, b in dict(data.get("buffers") or {}).items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"malformed flat layout description: {err!r}") from None
        return cls(params, buffers)


def network_layout(info: Mapping[str, Any]) -> FlatLayout | None:
    """The :class:`FlatLayout` of a generator (``info`` of a
    :class:`~metanet.tasks.generation.GenerationTask`: its ``"layout"`` key, or
    ``info["zoo_info"]["layout"]`` in checkpoints written before that key), or ``None`` when its
    networks are a weight space (``ws.load_into`` loads them)."""
    data = info.get("layout") or (info.get("zoo_info") or {}).get("layout")  # older checkpoints
    return FlatLayout.from_dict(data) if data else None


def zoo_buffer_means(params: Mapping[str, torch.Tensor], keys: Sequence[str]) -> dict:
    """Per-key average over the networks of stacked ``params`` ``{key: [N, ...]}`` for the buffer
    ``keys`` (floating point: the mean; integer counters: the first network's value)."""
    out = {}
    for k in keys:
        t = params[k]
        out[k] = t.float().mean(0).to(t.dtype) if t.is_floating_point() else t[0].clone()
    return out


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


def zoo_group_for(zoo: Any, arch: dict[str, Any], flat: bool = False) -> Any:
    """The group of ``zoo`` (a path or zoo object) that holds networks of ``arch`` (a
    generator's target architecture), e.g. its training networks for novelty.

    ``flat``: the generator reads the networks through a :class:`FlatLayout` (any module family:
    a group without a weight space matches too); otherwise the group must have a weight space.

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
            if group.spec is None and not flat:
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
        layout: ``"auto"`` (default: the weight space where the architecture has one, else a
            :class:`FlatLayout`), ``"weightspace"`` or ``"flat"`` (a flat parameter layout for
            any architecture; ``canonicalize=True`` needs a plain chain of Linear/Conv layers
            with BatchNorm: :meth:`~metanet.generate.canonicalize.ChannelPermutations.
            from_module`).

    After ``setup()``: ``spec`` (the pseudo spec of a flat layout), ``layout`` (the
    :class:`FlatLayout`, with the zoo's average buffers, or ``None`` for a weight space), ``arch``,
    ``dim``, ``conditions`` (vocabulary), ``labels`` [N],
    ``vectors`` [N, D] (normalized), ``mean`` / ``std`` [D], ``reference_vector`` [D] (raw
    reference network), ``test_acc`` [N], ``run_ids`` [N], ``task_classes`` (condition -> digit
    classes, when the zoo records them), ``zoo_info`` (name, kind, data split); with a holdout
    also ``holdout_vectors`` [H, D] (raw units, aligned like the training networks when
    canonicalized), ``holdout_test_acc`` [H], ``holdout_run_ids`` [H], ``holdout_records`` [H].
    With a flat layout, ``record_buffers`` / ``holdout_buffers`` ``{key: [N or H, ...]}`` are
    every network's own stored buffers (running statistics), permuted like its vector (else
    ``None``).

    Raises (in ``setup``, :class:`ZooInputError`, one line naming the zoo file): a zoo of several
    architectures without ``arch`` (the message names them); a flat layout with
    ``canonicalize=True`` of a module whose channel permutations are unknown (residual blocks,
    a user module), or of a group without an arch dict; fewer than 2 training networks
    left, or a holdout that leaves no run for training or asks for more runs than the zoo has; an
    unknown condition.
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
        layout: str = "auto",
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
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
        self.layout_kind = layout
        self.layout: FlatLayout | None = None
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
            if len(names) != 1:
                raise ZooInputError(
                    f"{where}: a generator models one architecture, and this zoo has "
                    f"{len(names)} {names}: choose one with arch=..."
                )
            group = zoo[names[0]]
        if group.spec is None and self.layout_kind == "weightspace":
            raise ZooInputError(
                f"{where}: architecture '{group.name}' has no weight space (norm/residual): "
                "use layout='flat' (or 'auto')"
            )
        return group

    def _flat_module(self, group: Any, where: str) -> tuple[nn.Module, Any]:
        """``(module, channel structure or None)`` of ``group`` for a flat layout; the structure
        (:class:`~metanet.generate.canonicalize.ChannelPermutations`) only with
        ``canonicalize``."""
        from metanet.zoo.architectures import build_module

        if not getattr(group, "arch", None):
            raise ZooInputError(
                f"{where}: '{group.name}' has no arch dict, which a flat parameter layout needs"
            )
        module = build_module(dict(group.arch))
        if not self.canonicalize:
            return module, None
        try:
            return module, ChannelPermutations.from_module(module)
        except WeightSpaceError as err:
            raise ZooInputError(
                f"{where}: '{group.name}' is generated through a flat parameter layout whose "
                f"channel permutations are unknown ({err}): set canonicalize=False"
            ) from None

    def _flat_params(self, group: Any, records: np.ndarray, module: nn.Module) -> dict:
        """Stacked parameters and stored buffers ``{key: [N, ...]}`` of ``records``."""
        names = {k for k, _ in module.named_parameters()}
        wanted = [k for k in module.state_dict() if k in names or k in group.keys]
        stacked = group.params(records)
        return {k: stacked[k] for k in wanted if k in stacked}

    @staticmethod
    def _flat_layout(module: nn.Module, params: Mapping[str, torch.Tensor]) -> FlatLayout:
        """The flat layout of ``module`` with the average stored buffers of stacked ``params``."""
        names = {k for k, _ in module.named_parameters()}
        stored = [k for k in module.state_dict() if k not in names and k in params]
        means = zoo_buffer_means(params, stored) if stored else {}
        return FlatLayout.from_module(module, means)

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
        flat = self.layout_kind == "flat" or (self.layout_kind == "auto" and group.spec is None)
        structure = module = flat_params = None
        if flat:
            module, structure = self._flat_module(group, where)
            flat_params = self._flat_params(group, keep, module)
            self.layout = self._flat_layout(module, flat_params)
            flat_spec = self.layout.spec()
            ws = WeightSpace.unflatten(self.layout.flatten(flat_params), flat_spec)
        else:
            self.layout = None
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
        align = {"max_iter": self.align_iter, "seed": self.seed}
        ref_params = None
        if self.canonicalize and structure is not None:
            flat_params = canonicalize_params(flat_params, structure, ref, **align)
            ref_params = {k: v[ref : ref + 1] for k, v in flat_params.items()}
            self.layout = self._flat_layout(module, flat_params)  # buffers averaged when aligned
            ws = WeightSpace.unflatten(self.layout.flatten(flat_params), flat_spec)
        elif self.canonicalize:
            ws = canonicalize_ws(ws, ref, **align)
        self.reference_index = int(keep[ref])
        self.holdout_records = torch.as_tensor(held)
        self.holdout_test_acc = torch.as_tensor(acc[held], dtype=torch.float32)
        self.holdout_run_ids = torch.as_tensor(runs_all[held])
        self.holdout_vectors = torch.zeros(0, ws.spec.num_params)
        self.record_buffers = self._buffers_of(flat_params)
        self.holdout_buffers = self._buffers_of(flat_params, empty=True)
        if len(held):
            if self.layout is not None:
                held_params = self._flat_params(group, held, module)
                if ref_params is not None:
                    held_params = canonicalize_params(held_params, structure, ref_params, **align)
                self.holdout_buffers = self._buffers_of(held_params)
                held_ws = WeightSpace.unflatten(self.layout.flatten(held_params), flat_spec)
            else:
                held_ws = group.weight_space(held).to(torch.float32)
                if self.canonicalize:
                    held_ws = canonicalize_ws(held_ws, ws[ref], **align)
            self.holdout_vectors = held_ws.flatten()
        self.spec: WeightSpaceSpec = ws.spec
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

    def _buffers_of(
        self, params: Mapping[str, torch.Tensor] | None, empty: bool = False
    ) -> dict[str, torch.Tensor] | None:
        """The layout's buffers ``{key: [N, ...]}`` of stacked ``params`` (``empty``: of zero
        networks), ``None`` without a flat layout; a buffer the zoo does not store is the
        layout's default, repeated."""
        if self.layout is None or params is None:
            return None
        n = 0 if empty else len(next(iter(params.values())))
        out = {}
        for k, default in self.layout.buffers.items():
            if k in params:
                out[k] = params[k][:n].clone()
            else:
                out[k] = default.unsqueeze(0).repeat(n, *([1] * default.dim()))
        return out

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
