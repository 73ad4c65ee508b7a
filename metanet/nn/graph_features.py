"""Inputs of the graph metanetworks: batch reading, node/edge encoders and probe features.

A batch of :class:`~metanet.graph.ParamGraph` (``torch_geometric.data.Batch``) is read once per
forward into a :class:`GraphBatch` (validated tensors plus the CSR pointers the scatter core
needs). :class:`NodeEncoder` and :class:`EdgeEncoder` turn the raw values into ``hidden``-wide
features.

Permutation equivariance of the encoders: the only node features that differ between neurons
of one layer are their own values (bias, running statistics, probe activations). Neurons that
are *not* permutable (inputs, outputs, spatial positions after ``flatten``; ``node_pos >= 0``)
additionally get a learned embedding of their index, as Neural Graphs does; hidden neurons only
get features shared by their whole layer (node type, depth, relative depth). Permuting the
hidden neurons of a network therefore permutes the encoded features in the same way.

Data statistics: the encoders standardize node/edge values per type (:class:`Standardizer`), or
with ``standardize="layer"`` per type and depth (an edge's depth is its destination neuron's), and
GMN's PNA scalers divide by the mean log-degree of the training graphs. Both come from a
:class:`GraphStats` of the *training* graphs: ``ParamGraphDataModule.graph_stats`` computes one
from the training split and metanet's tasks hand it to the model before training
(``model.set_data_statistics(stats)``). Outside Lightning, calibrate explicitly with
``model.calibrate(batch)`` (a representative batch of training graphs) or
``model.set_data_statistics(GraphStats.from_graphs(train_graphs))``. A forward through a model
that was never calibrated still works, but warns (:class:`UncalibratedWarning`) and calibrates on
that batch, once.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metanet import ops
from metanet.graph.paramgraph import NODE_FEATURES, EdgeType, NodeType, ParamGraph, ParamLayout
from metanet.nn.layers import FourierFeatures

DEFAULT_NODE_DIM = len(NODE_FEATURES)
DEFAULT_EDGE_DIM = 9  # ``max_kernel_size`` of ``metanet.graph.from_module``
STAT_LAYERS = 64
"""Depth slots of the per-layer value statistics (deeper nodes/edges share the last slot)."""
STANDARDIZE_MODES = ("type", "layer")


def standardize_mode(standardize: bool | str) -> str | None:
    """The value standardization an encoder's ``standardize`` asks for: ``"type"`` (``True``:
    statistics per node / edge type), ``"layer"`` (per type and depth) or ``None`` (``False``:
    raw values).

    Raises:
        ValueError: any other value.
    """
    if standardize is True:
        return "type"
    if standardize is False or standardize is None:
        return None
    if isinstance(standardize, str) and standardize in STANDARDIZE_MODES:
        return standardize
    raise ValueError(f"standardize must be true, false, 'type' or 'layer', got {standardize!r}")


def layer_keys(types: Tensor, layer: Tensor) -> Tensor:
    """Keys ``type * STAT_LAYERS + depth`` (depth clamped to ``STAT_LAYERS - 1``) of the
    per-layer statistics."""
    return types.long() * STAT_LAYERS + layer.long().clamp(0, STAT_LAYERS - 1)


_REQUIRED = ("x", "edge_index", "edge_attr", "edge_type", "node_type", "node_layer", "node_pos")


@dataclass
class GraphBatch:
    """Tensors of a batch of parameter graphs, validated, with the CSR pointers precomputed.

    ``N`` nodes, ``E`` edges (sorted by destination), ``G`` graphs.

    Attributes:
        x: ``[N, node_dim]`` node values; edge_attr: ``[E, edge_dim]`` edge values.
        node_type, node_layer, node_pos: ``[N]`` long; edge_type: ``[E]`` long.
        src, dst: ``[E]`` edge endpoints; dst_ptr: ``[N + 1]`` CSR pointer over ``dst``.
        node_graph: ``[N]`` graph index of every node; node_ptr: ``[G + 1]`` node offsets;
        edge_ptr: ``[G + 1]`` edge offsets (edges of a graph are contiguous).
        src_perm, src_ptr: edge order sorted by source and its CSR pointer ``[N + 1]``;
        rev_src, rev_dst: ``src[src_perm]`` (sorted) and ``dst[src_perm]`` (these four only
            when built with ``reverse=True``).
        probe: ``[N, P]`` probe features or ``None``.
    """

    x: Tensor
    edge_attr: Tensor
    node_type: Tensor
    node_layer: Tensor
    node_pos: Tensor
    edge_type: Tensor
    src: Tensor
    dst: Tensor
    dst_ptr: Tensor
    node_graph: Tensor
    node_ptr: Tensor
    edge_ptr: Tensor
    src_perm: Tensor | None = None
    src_ptr: Tensor | None = None
    rev_src: Tensor | None = None
    rev_dst: Tensor | None = None
    probe: Tensor | None = None

    @property
    def num_nodes(self) -> int:
        return self.x.size(0)

    @property
    def num_edges(self) -> int:
        return self.src.size(0)

    @property
    def num_graphs(self) -> int:
        return self.node_ptr.numel() - 1


def read_batch(batch: object, reverse: bool = False) -> GraphBatch:
    """Validate a ``Batch`` of :class:`ParamGraph` (or a single graph) and precompute pointers.

    Args:
        batch: ``torch_geometric.data.Batch.from_data_list([...ParamGraph])`` or one ParamGraph.
        reverse: also compute the source-sorted edge order (for messages against the edge
            direction).
    Raises:
        TypeError: ``batch`` is not a graph or lacks a ParamGraph attribute (named).
        ValueError: NaN/inf values, edges not sorted by destination, inconsistent sizes.
    """
    if isinstance(batch, GraphBatch):
        if reverse and batch.src_perm is None:
            raise ValueError("this GraphBatch was read without reverse=True")
        return batch
    missing = [k for k in _REQUIRED if getattr(batch, k, None) is None]
    if missing:
        raise TypeError(
            f"graph metanetworks expect a (Batch of) ParamGraph; {type(batch).__name__} "
            f"lacks {missing} (build graphs with metanet.graph.from_module)"
        )
    x, edge_attr = batch.x, batch.edge_attr
    edge_index = batch.edge_index
    if x.dim() != 2 or edge_attr.dim() != 2 or edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(
            f"bad graph shapes: x {tuple(x.shape)} (want [N, F]), edge_attr "
            f"{tuple(edge_attr.shape)} (want [E, K]), edge_index {tuple(edge_index.shape)}"
        )
    n, e = x.size(0), edge_index.size(1)
    if edge_attr.size(0) != e or batch.edge_type.numel() != e:
        raise ValueError(f"edge_attr/edge_type have {edge_attr.size(0)} rows, edge_index {e}")
    for name in ("node_type", "node_layer", "node_pos"):
        if getattr(batch, name).numel() != n:
            raise ValueError(f"'{name}' has {getattr(batch, name).numel()} entries, x has {n}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("graph node values (x: biases / norm statistics) contain NaN or inf")
    if not bool(torch.isfinite(edge_attr).all()):
        raise ValueError("graph edge values (edge_attr: weights) contain NaN or inf")
    # graphs store int32 endpoints and uint8 types; the scatter kernels index with int64
    src, dst = edge_index[0].long(), edge_index[1].long()
    if e > 1 and bool((dst[1:] < dst[:-1]).any()):
        raise ValueError("edge_index must be sorted by destination (as ParamGraph stores it)")
    if getattr(batch, "dst_ptr", None) is not None:
        dst_ptr = ParamGraph.batch_dst_ptr(batch)
        if dst_ptr.numel() != n + 1:
            raise ValueError(f"dst_ptr has {dst_ptr.numel()} entries, expected N + 1 = {n + 1}")
    else:
        dst_ptr = _ptr(dst, n)
    node_ptr = getattr(batch, "ptr", None)
    node_graph = getattr(batch, "batch", None)
    if node_ptr is None or node_graph is None:
        node_ptr = torch.tensor([0, n], device=x.device)
        node_graph = torch.zeros(n, dtype=torch.long, device=x.device)
    edge_ptr = dst_ptr[node_ptr]
    src_perm = src_ptr = rev_src = rev_dst = None
    if reverse:
        src_perm = torch.argsort(src, stable=True)
        rev_src, rev_dst = src[src_perm], dst[src_perm]
        src_ptr = _ptr(rev_src, n)
    probe = getattr(batch, "probe", None)
    if probe is not None and (probe.dim() != 2 or probe.size(0) != n):
        raise ValueError(f"probe features must be [N={n}, P], got {tuple(probe.shape)}")
    return GraphBatch(
        x=x,
        edge_attr=edge_attr,
        node_type=batch.node_type,
        node_layer=batch.node_layer,
        node_pos=batch.node_pos,
        edge_type=batch.edge_type.long(),
        src=src,
        dst=dst,
        dst_ptr=dst_ptr,
        node_graph=node_graph,
        node_ptr=node_ptr,
        edge_ptr=edge_ptr,
        src_perm=src_perm,
        src_ptr=src_ptr,
        rev_src=rev_src,
        rev_dst=rev_dst,
        probe=probe,
    )


def _ptr(index_sorted: Tensor, size: int) -> Tensor:
    counts = torch.bincount(index_sorted, minlength=size)
    ptr = torch.zeros(size + 1, dtype=torch.long, device=index_sorted.device)
    torch.cumsum(counts, 0, out=ptr[1:])
    return ptr


class UncalibratedWarning(UserWarning):
    """A standardizing graph model ran on a batch before any data statistics were set; it
    calibrated itself on that batch (see :meth:`GraphMetanetwork.calibrate`)."""


class _TypeMoments:
    """Per-type count, sum and sum of squares of value vectors (float64, on the CPU)."""

    def __init__(self, num_types: int, dim: int) -> None:
        self.count = torch.zeros(num_types, dtype=torch.float64)
        self.s1 = torch.zeros(num_types, dim, dtype=torch.float64)
        self.s2 = torch.zeros(num_types, dim, dtype=torch.float64)

    @property
    def dim(self) -> int:
        return self.s1.size(1)

    def add(self, v: Tensor, types: Tensor) -> None:
        """Add values ``v [M, D]`` with types ``[M]``, or ``v [k, M, D]``: ``k`` graphs of one
        structure sharing ``types [M]``."""
        v = v.detach().to("cpu", torch.float64)
        types = types.detach().to("cpu", torch.long)
        k = 1
        if v.dim() == 3:
            k = v.size(0)
            s1, s2 = v.sum(0), (v * v).sum(0)
        else:
            s1, s2 = v, v * v
        if s1.size(0) != types.numel():
            raise ValueError(f"{s1.size(0)} value rows but {types.numel()} types")
        if types.numel() and (int(types.min()) < 0 or int(types.max()) >= self.count.numel()):
            raise ValueError(f"types must lie in [0, {self.count.numel()})")
        self.count.index_add_(0, types, torch.full((types.numel(),), float(k), dtype=torch.float64))
        self.s1.index_add_(0, types, s1)
        self.s2.index_add_(0, types, s2)

    def mean_std(self) -> tuple[Tensor, Tensor]:
        """``(mean, std)`` ``[T, D]`` float32: population statistics per type; types without
        values get the statistics of all values; scales ``<= 1e-6`` (constant columns) become 1.
        """
        total = float(self.count.sum())
        if total <= 0:
            raise ValueError("no values to compute statistics from")
        count = self.count.unsqueeze(1)
        mean = self.s1 / count.clamp_min(1)
        var = (self.s2 / count.clamp_min(1) - mean * mean).clamp_min(0)
        all_mean = self.s1.sum(0) / total
        all_var = (self.s2.sum(0) / total - all_mean * all_mean).clamp_min(0)
        seen = count > 0
        mean = torch.where(seen, mean, all_mean)
        std = torch.where(seen, var, all_var).sqrt()
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        return mean.float(), std.float()


def _degree_hist(degree: Tensor) -> Tensor:
    return torch.bincount(degree.detach().to("cpu", torch.long))


def _add_hist(a: Tensor, b: Tensor) -> Tensor:
    n = max(a.numel(), b.numel())
    return nn.functional.pad(a, (0, n - a.numel())) + nn.functional.pad(b, (0, n - b.numel()))


@dataclass(frozen=True, eq=False)
class GraphStats:
    """Statistics of a set of (training) parameter graphs that the graph metanetworks need.

    Attributes:
        node_mean, node_std: ``[len(NodeType), node_dim]`` per-type, per-column mean and
            (population) std of the node values ``x`` (see :meth:`_TypeMoments.mean_std` for
            absent types and constant columns).
        edge_mean, edge_std: ``[len(EdgeType), edge_dim]`` the same for ``edge_attr``.
        in_degree_hist, out_degree_hist: long ``[D + 1]``: number of nodes with in- / out-degree
            ``d`` (PNA's degree statistics).
        num_graphs: graphs whose values went into the value statistics.
        node_layer_mean, node_layer_std, edge_layer_mean, edge_layer_std: the same per type *and
            depth* (``[len(NodeType) * STAT_LAYERS, dim]``, rows :func:`layer_keys`; a
            (type, depth) without values gets its type's statistics), for
            ``standardize="layer"``; ``None`` when the values were added without depths.
    """

    node_mean: Tensor
    node_std: Tensor
    edge_mean: Tensor
    edge_std: Tensor
    in_degree_hist: Tensor
    out_degree_hist: Tensor
    num_graphs: int
    node_layer_mean: Tensor | None = None
    node_layer_std: Tensor | None = None
    edge_layer_mean: Tensor | None = None
    edge_layer_std: Tensor | None = None

    @property
    def has_layer_stats(self) -> bool:
        """Whether the per-(type, depth) statistics of ``standardize="layer"`` are present."""
        return self.node_layer_mean is not None and self.edge_layer_mean is not None

    @property
    def node_dim(self) -> int:
        """Columns of the node values ``x``."""
        return self.node_mean.size(1)

    @property
    def edge_dim(self) -> int:
        """Columns of the edge values ``edge_attr``."""
        return self.edge_mean.size(1)

    def avg_log_degree(self, bidirectional: bool = False) -> float:
        """Mean ``log(deg + 1)`` over the nodes (PNA's ``delta``): of the in-degrees, or with
        ``bidirectional`` of the in- and out-degrees together (messages in both directions)."""
        hist = self.in_degree_hist
        if bidirectional:
            hist = _add_hist(hist, self.out_degree_hist)
        return ops.degree_statistics(hist)[0]

    @classmethod
    def from_graphs(cls, graphs: Iterable[object]) -> GraphStats:
        """Statistics of ``graphs``: ParamGraphs, PyG ``Batch`` es of them or
        :class:`GraphBatch` es (e.g. every batch of a training loader)."""
        acc: GraphStatsAccumulator | None = None
        for g in graphs:
            gb = read_batch(g)
            if acc is None:
                acc = GraphStatsAccumulator(gb.x.size(1), gb.edge_attr.size(1))
            acc.add(gb)
        if acc is None:
            raise ValueError("GraphStats.from_graphs needs at least one graph")
        return acc.result()


class GraphStatsAccumulator:
    """Collects :class:`GraphStats` over many graphs without keeping them.

    Args:
        node_dim: columns of ``x``; edge_dim: columns of ``edge_attr``.
    """

    def __init__(self, node_dim: int = DEFAULT_NODE_DIM, edge_dim: int = DEFAULT_EDGE_DIM) -> None:
        self.nodes = _TypeMoments(len(NodeType), node_dim)
        self.edges = _TypeMoments(len(EdgeType), edge_dim)
        self.node_layers = _TypeMoments(len(NodeType) * STAT_LAYERS, node_dim)
        self.edge_layers = _TypeMoments(len(EdgeType) * STAT_LAYERS, edge_dim)
        self._without_layers = False
        self.in_hist = torch.zeros(1, dtype=torch.long)
        self.out_hist = torch.zeros(1, dtype=torch.long)
        self.num_graphs = 0

    def add(self, graphs: object) -> None:
        """Add the values and degrees of one ParamGraph, ``Batch`` or :class:`GraphBatch`."""
        g = read_batch(graphs)
        self.add_values(g.x, g.node_type, g.edge_attr, g.edge_type, num_graphs=g.num_graphs,
                        node_layer=g.node_layer, edge_layer=g.node_layer[g.dst])  # fmt: skip
        in_deg = g.dst_ptr[1:] - g.dst_ptr[:-1]
        out_deg = torch.bincount(g.src, minlength=g.num_nodes)
        self.add_degrees(in_deg, out_deg)

    def add_values(
        self, x: Tensor, node_type: Tensor, edge_attr: Tensor, edge_type: Tensor,
        num_graphs: int | None = None, node_layer: Tensor | None = None,
        edge_layer: Tensor | None = None,
    ) -> None:  # fmt: skip
        """Add node values ``x [N, F]`` and edge values ``edge_attr [E, K]`` with their types;
        or ``x [k, N, F]``, ``edge_attr [k, E, K]``: ``k`` graphs of one structure (``num_graphs``
        defaults to ``k``, or 1 for 2-d values). ``node_layer [N]`` / ``edge_layer [E]``: the
        depth of each node and edge (the destination node's), for the per-layer statistics;
        values added without them leave those statistics out of :meth:`result`."""
        for v, moments, kind, name in (
            (x, self.nodes, "node values (x)", "node_in_dim"),
            (edge_attr, self.edges, "edge values (edge_attr)", "edge_in_dim"),
        ):
            if v.size(-1) != moments.dim:
                raise ValueError(
                    f"{kind} have {v.size(-1)} columns, these statistics are for "
                    f"{moments.dim} ({name})"
                )
        self.nodes.add(x, node_type)
        self.edges.add(edge_attr, edge_type)
        if node_layer is None or edge_layer is None:
            self._without_layers = True
        else:
            self.node_layers.add(x, layer_keys(node_type, node_layer))
            self.edge_layers.add(edge_attr, layer_keys(edge_type, edge_layer))
        if num_graphs is None:
            num_graphs = x.size(0) if x.dim() == 3 else 1
        self.num_graphs += int(num_graphs)

    def add_degrees(self, in_degree: Tensor, out_degree: Tensor, repeats: int = 1) -> None:
        """Add per-node in- and out-degrees (``[N]`` each), counted ``repeats`` times (e.g. the
        number of graphs sharing this structure)."""
        self.in_hist = _add_hist(self.in_hist, _degree_hist(in_degree) * int(repeats))
        self.out_hist = _add_hist(self.out_hist, _degree_hist(out_degree) * int(repeats))

    def result(self) -> GraphStats:
        """The collected :class:`GraphStats`.

        Raises:
            ValueError: nothing was added.
        """
        if self.num_graphs == 0 or float(self.nodes.count.sum()) == 0:
            raise ValueError("no graphs were added: there are no statistics to compute")
        node_mean, node_std = self.nodes.mean_std()
        if float(self.edges.count.sum()) > 0:
            edge_mean, edge_std = self.edges.mean_std()
        else:  # graphs without edges: identity standardization
            edge_mean = torch.zeros(self.edges.s1.shape)
            edge_std = torch.ones(self.edges.s1.shape)
        layer_stats: tuple[Tensor | None, ...] = (None,) * 4
        if not self._without_layers:
            layer_stats = (*_per_layer(self.node_layers, node_mean, node_std),
                           *_per_layer(self.edge_layers, edge_mean, edge_std))  # fmt: skip
        return GraphStats(
            node_mean, node_std, edge_mean, edge_std, self.in_hist.clone(), self.out_hist.clone(),
            self.num_graphs, *layer_stats,
        )  # fmt: skip


def _per_layer(moments: _TypeMoments, type_mean: Tensor, type_std: Tensor
               ) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(mean, std)`` per (type, depth) key; keys without values get their type's."""
    fallback_mean = type_mean.repeat_interleave(STAT_LAYERS, 0)
    fallback_std = type_std.repeat_interleave(STAT_LAYERS, 0)
    if float(moments.count.sum()) <= 0:
        return fallback_mean, fallback_std
    mean, std = moments.mean_std()
    seen = (moments.count > 0).unsqueeze(1)
    return torch.where(seen, mean, fallback_mean), torch.where(seen, std, fallback_std)


class Standardizer(nn.Module):
    """Per-type standardization ``(v - mean[type]) / std[type]`` of value vectors.

    Zoo weights are small (``~0.1``) next to learned embeddings, so raw values barely move the
    features of an untrained model; Neural Graphs standardizes them with per-layer dataset
    statistics. Here the per-type, per-column statistics of the training graphs are set once
    (:meth:`set_statistics` from a :class:`GraphStats`, or :meth:`calibrate` from values) and
    kept as buffers (saved in checkpoints), so every call is a fixed affine map: invariant
    statistics, equivariant map. A forward before either warns (:class:`UncalibratedWarning`)
    and calibrates on its input.

    Args:
        num_types: number of node or edge types.
        dim: value columns.
    """

    def __init__(self, num_types: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_types, dim))
        self.register_buffer("std", torch.ones(num_types, dim))
        self.register_buffer("calibrated", torch.tensor(False))

    @property
    def is_calibrated(self) -> bool:
        """Whether statistics were set (or loaded from a checkpoint)."""
        return bool(self.calibrated)

    @torch.no_grad()
    def set_statistics(self, mean: Tensor, std: Tensor) -> None:
        """Use ``mean`` / ``std`` (``[num_types, dim]``, e.g. ``GraphStats.node_mean`` /
        ``node_std``)."""
        if tuple(mean.shape) != tuple(self.mean.shape) or tuple(std.shape) != tuple(self.std.shape):
            raise ValueError(
                f"statistics of shape {tuple(mean.shape)} / {tuple(std.shape)} do not fit this "
                f"standardizer's {tuple(self.mean.shape)} ([types, value columns])"
            )
        if not (bool(torch.isfinite(mean).all()) and bool((std > 0).all())):
            raise ValueError("statistics must be finite, with positive std")
        self.mean.copy_(mean)
        self.std.copy_(std)
        self.calibrated.fill_(True)

    @torch.no_grad()
    def calibrate(self, v: Tensor, types: Tensor) -> None:
        """Set the statistics from values ``v [M, dim]`` with types ``[M]``."""
        moments = _TypeMoments(*self.mean.shape)
        moments.add(v, types)
        self.set_statistics(*moments.mean_std())

    def forward(self, v: Tensor, types: Tensor) -> Tensor:
        if not self.is_calibrated:
            warnings.warn(
                "Standardizer: no data statistics were set; calibrating on this input (set them "
                "with set_statistics or calibrate first)",
                UncalibratedWarning,
                stacklevel=2,
            )
            self.calibrate(v, types)
        return (v - self.mean[types]) / self.std[types]


class ValueEncoder(nn.Module):
    """``[M, in_dim] -> [M, out_dim]``: a Linear map, or random Fourier features + Linear."""

    def __init__(
        self, in_dim: int, out_dim: int, fourier_features: int = 0, sigma: float = 1.0
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        if fourier_features > 0:
            self.net: nn.Module = nn.Sequential(
                FourierFeatures(in_dim, fourier_features, sigma),
                nn.Linear(2 * fourier_features, out_dim),
            )
        else:
            self.net = nn.Linear(in_dim, out_dim)

    def forward(self, v: Tensor, what: str) -> Tensor:
        if v.size(-1) != self.in_dim:
            raise ValueError(
                f"{what} have {v.size(-1)} columns, the model was built for {self.in_dim} "
                f"(pass {'node_in_dim' if what.startswith('node') else 'edge_in_dim'})"
            )
        return self.net(v)


class NodeEncoder(nn.Module):
    """Node features ``[N, hidden]`` of a :class:`GraphBatch`.

    Sum of: encoded node values ``x``; a node-type embedding; an embedding of the depth
    ``node_layer`` (clamped to ``max_layers - 1``) and a linear map of the relative depth
    ``node_layer / max depth of the graph``; for fixed-position nodes (``node_pos >= 0``:
    inputs, outputs, flattened positions) a learned embedding of ``(node_type, node_pos)``
    (positions clamped to ``max_positions - 1``); projected probe features when ``probe_dim``.

    Args:
        hidden: output width.
        node_in_dim: columns of ``x`` (default: the ParamGraph's 3).
        fourier_features: random Fourier features of the values (0: a Linear map).
        fourier_sigma: scale of the Fourier frequencies.
        max_layers, max_positions: embedding table sizes.
        probe_dim: width of ``graph.probe`` (see :func:`probe_features`), 0 to ignore probes.
        standardize: standardize values per node type (``True`` or ``"type"``), per node type
            and depth (``"layer"``: each layer of a network on its own scale, e.g. SIREN layers
            whose values differ ~30x in scale) or not (``False``); see :class:`Standardizer`.
    """

    def __init__(
        self,
        hidden: int,
        node_in_dim: int | None = None,
        fourier_features: int = 0,
        fourier_sigma: float = 1.0,
        max_layers: int = 64,
        max_positions: int = 1024,
        probe_dim: int = 0,
        standardize: bool | str = True,
    ) -> None:
        super().__init__()
        self.node_in_dim = DEFAULT_NODE_DIM if node_in_dim is None else node_in_dim
        self.standardize_by = standardize_mode(standardize)
        self.standardize = _make_standardizer(self.standardize_by, len(NodeType), self.node_in_dim)
        self.values = ValueEncoder(self.node_in_dim, hidden, fourier_features, fourier_sigma)
        self.max_layers, self.max_positions = max_layers, max_positions
        self.type_emb = nn.Embedding(len(NodeType), hidden)
        self.layer_emb = nn.Embedding(max_layers, hidden)
        self.depth = nn.Linear(1, hidden, bias=False)
        self.pos_emb = nn.Embedding(len(NodeType) * max_positions, hidden)
        self.probe_dim = probe_dim
        self.probe = nn.Linear(probe_dim, hidden) if probe_dim > 0 else None

    def forward(self, g: GraphBatch) -> Tensor:
        keys = g.node_type
        if self.standardize_by == "layer":
            keys = layer_keys(g.node_type, g.node_layer)
        h = self.values(_standardized(self.standardize, g.x, keys), "node values (x)")
        h = h + self.type_emb(g.node_type)
        h = h + self.layer_emb(g.node_layer.clamp(0, self.max_layers - 1))
        layer = g.node_layer.to(h.dtype).unsqueeze(1)
        max_depth = ops.segment(layer, g.node_ptr, reduce="max").clamp_min(1.0)
        h = h + self.depth(layer / max_depth[g.node_graph])
        fixed = g.node_pos >= 0
        idx = g.node_type * self.max_positions + g.node_pos.clamp(0, self.max_positions - 1)
        h = h + self.pos_emb(idx) * fixed.unsqueeze(1).to(h.dtype)
        if self.probe is not None:
            if g.probe is None:
                raise ValueError(
                    f"the model was built with probe_dim={self.probe_dim} but the graphs carry "
                    "no 'probe' features (add them with metanet.nn.graph_features.probe_features)"
                )
            if g.probe.size(1) != self.probe_dim:
                raise ValueError(f"probe features have {g.probe.size(1)} columns, expected "
                                 f"probe_dim={self.probe_dim}")  # fmt: skip
            h = h + self.probe(g.probe)
        return h


class EdgeEncoder(nn.Module):
    """Edge features ``[E, hidden]``: encoded edge values (weight / flattened kernel) plus an
    edge-type embedding.

    Args:
        hidden: output width.
        edge_in_dim: columns of ``edge_attr`` (default 9, ``from_module``'s max kernel size).
        fourier_features, fourier_sigma, standardize: as in :class:`NodeEncoder` (per edge
            type, or per edge type and the depth of the edge's destination neuron).
    """

    def __init__(
        self,
        hidden: int,
        edge_in_dim: int | None = None,
        fourier_features: int = 0,
        fourier_sigma: float = 1.0,
        standardize: bool | str = True,
    ) -> None:
        super().__init__()
        self.edge_in_dim = DEFAULT_EDGE_DIM if edge_in_dim is None else edge_in_dim
        self.standardize_by = standardize_mode(standardize)
        self.standardize = _make_standardizer(self.standardize_by, len(EdgeType), self.edge_in_dim)
        self.values = ValueEncoder(self.edge_in_dim, hidden, fourier_features, fourier_sigma)
        self.type_emb = nn.Embedding(len(EdgeType), hidden)

    def forward(self, g: GraphBatch) -> Tensor:
        keys = g.edge_type
        if self.standardize_by == "layer":
            keys = layer_keys(g.edge_type, g.node_layer[g.dst])
        v = _standardized(self.standardize, g.edge_attr, keys)
        return self.values(v, "edge values (edge_attr)") + self.type_emb(g.edge_type)


def check_value_widths(stats: GraphStats, node_in_dim: int, edge_in_dim: int) -> None:
    """Check that ``stats`` were collected from graphs with the value widths a model was built
    for (``node_in_dim`` columns of ``x``, ``edge_in_dim`` of ``edge_attr``).

    Raises:
        ValueError: a width differs (one line naming it and the argument to pass).
    """
    for dim, width, what, name in (
        (stats.node_dim, node_in_dim, "node values (x)", "node_in_dim"),
        (stats.edge_dim, edge_in_dim, "edge values (edge_attr)", "edge_in_dim"),
    ):
        if dim != width:
            raise ValueError(
                f"{what} have {dim} columns, the model was built for {width} (pass {name})"
            )


@torch.no_grad()
def set_encoder_statistics(nodes: NodeEncoder, edges: EdgeEncoder, stats: GraphStats) -> None:
    """Hand the value statistics of ``stats`` to the encoders' standardizers (if any): per type,
    or per type and depth for encoders built with ``standardize="layer"``.

    Raises:
        ValueError: the statistics' value widths differ from the encoders' input widths, or a
            per-layer encoder gets statistics without per-layer values.
    """
    check_value_widths(stats, nodes.values.in_dim, edges.values.in_dim)
    layered = [enc for enc in (nodes, edges) if enc.standardize_by == "layer"]
    if layered and not stats.has_layer_stats:
        raise ValueError("standardize='layer' needs per-layer statistics: these GraphStats were "
                         "collected without node/edge depths (GraphStatsAccumulator.add_values "
                         "without node_layer / edge_layer)")  # fmt: skip
    if nodes.standardize is not None:
        if nodes.standardize_by == "layer":
            nodes.standardize.set_statistics(stats.node_layer_mean, stats.node_layer_std)
        else:
            nodes.standardize.set_statistics(stats.node_mean, stats.node_std)
    if edges.standardize is not None:
        if edges.standardize_by == "layer":
            edges.standardize.set_statistics(stats.edge_layer_mean, stats.edge_layer_std)
        else:
            edges.standardize.set_statistics(stats.edge_mean, stats.edge_std)


@torch.no_grad()
def calibrate_encoders(nodes: NodeEncoder, edges: EdgeEncoder, g: GraphBatch) -> None:
    """(Re)set the encoders' value statistics from the graphs of ``g``."""
    set_encoder_statistics(nodes, edges, GraphStats.from_graphs([g]))


def encoders_calibrated(nodes: NodeEncoder, edges: EdgeEncoder) -> bool:
    """Whether both encoders' standardizers (where they standardize) have statistics."""
    return all(s is None or s.is_calibrated for s in (nodes.standardize, edges.standardize))


def _make_standardizer(mode: str | None, num_types: int, dim: int) -> Standardizer | None:
    if mode is None:
        return None
    return Standardizer(num_types * (STAT_LAYERS if mode == "layer" else 1), dim)


def _standardized(std: Standardizer | None, v: Tensor, types: Tensor) -> Tensor:
    if std is None:
        return v
    if v.size(1) != std.mean.size(1):
        return v  # the ValueEncoder names the width mismatch
    return std(v, types)


# ----------------------------------------------------------------------------- probe features
_CHANNEL_LAST = (nn.Linear, nn.LayerNorm)
_CHANNEL_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)


def _per_channel(out: Tensor, channel_dim: int) -> Tensor:
    """``[P, ..., C, ...] -> [C, P]``: mean over every axis but the probe and channel axes."""
    out = out.movedim(channel_dim, -1)
    out = out.reshape(out.size(0), -1, out.size(-1)).mean(1)
    return out.t()


@torch.no_grad()
def probe_features(graph: ParamGraph, module: nn.Module, inputs: Tensor) -> Tensor:
    """Activations of ``module`` on probe ``inputs`` as node features ``[N, P]`` (NG's probes).

    Every neuron node made by a Linear / Conv / BatchNorm / GroupNorm / LayerNorm gets that
    layer's output for each of the ``P`` probe inputs (averaged over spatial or sequence axes);
    input nodes get the input value (channel mean for images); other nodes get 0. The values
    permute with the neurons, so the features keep the models equivariant. Attach them with
    ``graph.probe = probe_features(graph, module, inputs)`` and build the model with
    ``probe_dim=P``.

    Args:
        graph: the module's ParamGraph (its layout says which edges belong to which layer).
        module: the network the graph was built from (put in ``eval()`` mode temporarily).
        inputs: ``[P, *input_shape]`` probe inputs.
    Raises:
        ValueError: an input whose channel count differs from the graph's input nodes.
    """
    layout = getattr(graph, "layout", None)
    if not isinstance(layout, ParamLayout):
        raise TypeError("probe_features needs one ParamGraph (with its layout), not a Batch")
    n = graph.num_nodes
    feats = torch.zeros(n, inputs.size(0), dtype=graph.x.dtype)
    hooks, captured = [], {}
    for name, mod in module.named_modules():
        if isinstance(mod, _CHANNEL_LAST + _CHANNEL_FIRST):
            dim = -1 if isinstance(mod, _CHANNEL_LAST) else 1

            def hook(m: nn.Module, args: tuple, out: Tensor, name: str = name, dim: int = dim):
                captured[name] = _per_channel(out, dim)

            hooks.append(mod.register_forward_hook(hook))
    was_training = module.training
    module.eval()
    try:
        module(inputs)
    finally:
        module.train(was_training)
        for h in hooks:
            h.remove()
    for name, act in captured.items():
        key = f"{name}.weight" if name else "weight"
        slot = layout.slots.get(key)
        if slot is None or slot.source != "edge":
            continue
        rows = slot.rows.view(act.size(0), -1)[:, 0]
        feats[graph.edge_index[1, rows]] = act.to(feats.dtype)
    inp = graph.node_type == NodeType.INPUT
    first = inputs if inputs.dim() == 2 else _per_channel(inputs, 1).t()
    pos = graph.node_pos[inp]
    if pos.numel() and int(pos.max()) >= first.size(1):
        raise ValueError(
            f"the graph has {int(pos.max()) + 1} input neurons/channels, the probe inputs "
            f"{first.size(1)}"
        )
    feats[inp] = first[:, pos].t().to(feats.dtype)
    return feats


def make_probe_inputs(shape: Sequence[int], num: int, seed: int = 0) -> Tensor:
    """``num`` fixed standard-normal probe inputs ``[num, *shape]`` (same for every network)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num, *shape, generator=gen)
