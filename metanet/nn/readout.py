"""Invariant readouts of the graph metanetworks: per-graph pooling of node and edge features.

Pooling over all nodes / edges of a graph (sum, mean, max, min) is invariant to any permutation
of the hidden neurons. Output neurons are not permutable, so their features may also be read
in order (Neural Graphs' ``cat`` readout): ``output_slots`` concatenates the features of the
output nodes ``node_pos = 0 .. output_slots - 1`` (zeros where a network has fewer outputs).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from metanet import ops
from metanet.graph.paramgraph import NodeType
from metanet.nn.graph_features import (
    GraphBatch,
    GraphStats,
    UncalibratedWarning,
    encoders_calibrated,
    read_batch,
    set_encoder_statistics,
)
from metanet.nn.layers import mlp_head

POOLS = ("sum", "mean", "max", "min")


def _check_pools(pools: Sequence[str], what: str) -> tuple[str, ...]:
    bad = [p for p in pools if p not in POOLS]
    if bad:
        raise ValueError(f"{what}: unknown pooling {bad}; choose from {POOLS}")
    return tuple(pools)


def output_node_features(h: Tensor, g: GraphBatch, slots: int) -> Tensor:
    """Features of each graph's output neurons in index order: ``[G, slots * d]``.

    Output nodes with ``node_pos >= slots`` are ignored; missing slots stay 0.
    """
    return fixed_node_features(h, g, NodeType.OUTPUT, slots)


def fixed_node_features(h: Tensor, g: GraphBatch, node_type: NodeType, slots: int) -> Tensor:
    """Features of each graph's fixed-position nodes of one type (``INPUT``, ``OUTPUT``) in
    ``node_pos`` order: ``[G, slots * d]``; positions ``>= slots`` are ignored, missing slots
    stay 0."""
    d = h.size(1)
    out = h.new_zeros(g.num_graphs * slots, d)
    keep = (g.node_type == node_type) & (g.node_pos >= 0) & (g.node_pos < slots)
    idx = g.node_graph[keep] * slots + g.node_pos[keep]
    out = out.index_copy(0, idx, h[keep])
    return out.view(g.num_graphs, slots * d)


class GraphReadout(nn.Module):
    """Invariant head ``(nodes [N, node_dim], edges [E, edge_dim]) -> [G, out_dim]``.

    Each node / edge feature first goes through ``Linear + SiLU`` (DeepSets' ``phi``), is pooled
    per graph with every reduction in ``node_pool`` / ``edge_pool``, optionally concatenated with
    the ordered output-neuron features, and mapped by an MLP (``num_layers`` hidden layers).

    Args:
        node_dim, edge_dim: input widths (``edge_dim`` unused when ``edge_pool`` is empty).
        hidden: width of ``phi`` and of the MLP.
        out_dim: output width.
        node_pool, edge_pool: reductions among ``sum, mean, max, min``.
        output_slots: read the first ``output_slots`` output neurons in order (0: off).
        num_layers: hidden layers of the final MLP.
        dropout: dropout in the final MLP.
    """

    def __init__(
        self,
        node_dim: int,
        edge_dim: int,
        hidden: int,
        out_dim: int,
        node_pool: Sequence[str] = ("mean", "max"),
        edge_pool: Sequence[str] = ("mean",),
        output_slots: int = 0,
        num_layers: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.node_pool = _check_pools(node_pool, "node_pool")
        self.edge_pool = _check_pools(edge_pool, "edge_pool")
        if not self.node_pool and not self.edge_pool and output_slots <= 0:
            raise ValueError("GraphReadout needs node_pool, edge_pool or output_slots")
        self.output_slots = output_slots
        self.node_phi = nn.Sequential(nn.Linear(node_dim, hidden), nn.SiLU())
        self.edge_phi = (
            nn.Sequential(nn.Linear(edge_dim, hidden), nn.SiLU()) if self.edge_pool else None
        )
        width = hidden * (len(self.node_pool) + len(self.edge_pool)) + node_dim * output_slots
        self.mlp = mlp_head(width, hidden, out_dim, num_layers, dropout, nn.SiLU)

    def pooled(self, x: Tensor, e: Tensor | None, g: GraphBatch) -> Tensor:
        """The invariant graph embedding before the MLP: ``[G, width]``."""
        parts = []
        if self.node_pool:
            h = self.node_phi(x)
            parts += [ops.segment(h, g.node_ptr, reduce=r) for r in self.node_pool]
        if self.edge_pool:
            if e is None:
                raise ValueError("this readout pools edges but got no edge features")
            h = self.edge_phi(e)
            parts += [ops.segment(h, g.edge_ptr, reduce=r) for r in self.edge_pool]
        if self.output_slots:
            parts.append(output_node_features(x, g, self.output_slots))
        return torch.cat(parts, dim=1)

    def forward(self, x: Tensor, e: Tensor | None, g: GraphBatch) -> Tensor:
        return self.mlp(self.pooled(x, e, g))


class GraphMetanetwork(nn.Module):
    """Shared frame of the edge-updating graph metanetworks (:class:`~metanet.nn.gmn.GMN`,
    :class:`~metanet.nn.ngt.NGT`): node/edge encoders, a stack of layers (built by the
    subclass), and one head chosen by ``output``: an invariant :class:`GraphReadout`
    (``"graph"``, ``[G, out_dim]``), a per-edge MLP (``"edge"``, ``[E, edge_out_dim]``) or a
    per-node MLP (``"node"``, ``[N, node_out_dim]``). Subclasses implement :meth:`embed`.

    Data statistics: the per-type value standardization of the encoders (and GMN's PNA degree
    normalization) needs statistics of the *training* graphs, kept as buffers (saved in
    checkpoints). Set them with :meth:`set_data_statistics` (a :class:`GraphStats`, e.g.
    ``ParamGraphDataModule.graph_stats``, which metanet's tasks hand over before training) or
    :meth:`calibrate` (a representative batch of training graphs). A forward through a model
    that has none (:attr:`is_calibrated` false) warns with :class:`UncalibratedWarning` and
    calibrates on that batch, once.
    """

    def _build_encoders(
        self, hidden: int, edge_dim: int, node_in_dim: int | None, edge_in_dim: int | None,
        num_layers: int, fourier_features: int, fourier_sigma: float, max_layers: int,
        max_positions: int, probe_dim: int, standardize: bool | str, output: str,
    ) -> None:  # fmt: skip
        """Check ``output``/``num_layers``; build the node and edge encoders."""
        from metanet.nn.graph_features import EdgeEncoder, NodeEncoder

        if output not in ("graph", "edge", "node"):
            raise ValueError(f"output must be 'graph', 'edge' or 'node', got {output!r}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.output = output
        self.nodes = NodeEncoder(hidden, node_in_dim, fourier_features, fourier_sigma,
                                 max_layers, max_positions, probe_dim, standardize)  # fmt: skip
        self.edges = EdgeEncoder(edge_dim, edge_in_dim, fourier_features, fourier_sigma,
                                 standardize)  # fmt: skip

    def _build_head(
        self, hidden: int, edge_dim: int, node_pool: Sequence[str], edge_pool: Sequence[str],
        output_slots: int, head_layers: int, out_dim: int, edge_out_dim: int,
        node_out_dim: int, dropout: float, activation: type[nn.Module],
    ) -> None:  # fmt: skip
        """Build the head of ``self.output`` (after the layers, to keep seeded inits stable)."""
        self.readout = self.edge_head = self.node_head = None
        if self.output == "graph":
            self.readout = GraphReadout(hidden, edge_dim, hidden, out_dim, node_pool, edge_pool,
                                        output_slots, head_layers, dropout)  # fmt: skip
        elif self.output == "edge":
            self.edge_head = nn.Sequential(
                nn.Linear(edge_dim, edge_dim), activation(), nn.Linear(edge_dim, edge_out_dim)
            )
        else:
            self.node_head = nn.Sequential(
                nn.Linear(hidden, hidden), activation(), nn.Linear(hidden, node_out_dim)
            )

    def _layer_updates_edges(
        self, i: int, num_layers: int, update_edges: bool, edge_pool: Sequence[str]
    ) -> bool:
        """Whether layer ``i`` updates edges: every layer when asked (always for
        ``output="edge"``), except the last one unless its edges are read out."""
        read_out = self.output == "edge" or (self.output == "graph" and len(edge_pool) > 0)
        return (update_edges or self.output == "edge") and (i < num_layers - 1 or read_out)

    # -- data statistics ----------------------------------------------------------------------
    @property
    def is_calibrated(self) -> bool:
        """Whether every data statistic the model uses is set (or loaded from a checkpoint)."""
        return encoders_calibrated(self.nodes, self.edges) and self._degree_calibrated()

    def _degree_calibrated(self) -> bool:
        """Subclass hook: whether the degree statistics are set (none needed here)."""
        return True

    def _set_degree_statistics(self, stats: GraphStats) -> None:
        """Subclass hook: take the degree statistics of ``stats`` (none needed here)."""

    @torch.no_grad()
    def set_data_statistics(self, stats: GraphStats) -> None:
        """Use the statistics of the training graphs: per-type value standardization of the
        encoders and (GMN) PNA's average log-degree.

        Raises:
            ValueError: the statistics' value widths differ from ``node_in_dim`` /
                ``edge_in_dim``.
        """
        set_encoder_statistics(self.nodes, self.edges, stats)
        self._set_degree_statistics(stats)

    @torch.no_grad()
    def calibrate(self, batch: object) -> None:
        """Set the data statistics from ``batch`` (a ParamGraph or ``Batch``: a representative
        batch of training graphs), replacing any set before."""
        self.set_data_statistics(GraphStats.from_graphs([read_batch(batch)]))

    def _ensure_calibrated(self, g: GraphBatch) -> None:
        """Calibrate on ``g``, with a warning, when no statistics were ever set."""
        if self.is_calibrated:
            return
        warnings.warn(
            f"{type(self).__name__} has no data statistics (value standardization / PNA degree); "
            "calibrating on this batch. Call model.set_data_statistics(datamodule.graph_stats) "
            "or model.calibrate(training_batch) before the first forward (metanet's tasks do so "
            "from the training split).",
            UncalibratedWarning,
            stacklevel=3,
        )
        self.calibrate(g)

    def embed(self, batch: object) -> tuple[Tensor, Tensor, GraphBatch]:
        """Final node ``[N, hidden]`` and edge ``[E, edge_dim]`` features of a batch."""
        raise NotImplementedError

    def forward(self, batch: object) -> Tensor:
        h, e, g = self.embed(batch)
        if self.readout is not None:
            return self.readout(h, e, g)
        if self.edge_head is not None:
            return self.edge_head(e)
        return self.node_head(h)
