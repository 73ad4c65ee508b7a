"""Graph metanetworks with edge updates (GMN, Lim et al. 2024; NG-GNN, Kofinas et al. 2024).

Message passing on :class:`~metanet.graph.ParamGraph` batches. One :class:`GMNLayer`:

* messages along every edge ``j -> i`` (weight ``w_ij`` with features ``e``), FiLM-modulated by
  the edge as in NG's PNA: ``m = s(e) * (A h_j + B h_i) + t(e)``;
* PNA multi-aggregation of the messages into each destination (``mean/min/max/std`` ... with
  degree scalers; :func:`metanet.ops.multi_aggregate` over the destination CSR), and with
  ``bidirectional`` a second set of messages against the edge direction aggregated into each
  source (information flows from outputs back to inputs too);
* node update ``h_i <- LN(MLP([h_i, agg_in_i, agg_out_i]))`` (optionally residual);
* edge update ``e_ij <- LN(e_ij + W_2 act(W_e e_ij + W_s h_j + W_t h_i))``.

Every step is a per-node / per-edge map or an aggregation over a neighbour set, and the input
features (:mod:`metanet.nn.graph_features`) only distinguish fixed-position neurons, so node and
edge outputs are equivariant and the pooled readout is invariant to hidden-neuron permutations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from metanet import ops
from metanet.nn.graph_features import GraphBatch, GraphStats, read_batch
from metanet.nn.readout import GraphMetanetwork

AGGREGATORS = ("sum", "mean", "max", "min", "std")
SCALERS = ("identity", "amplification", "attenuation")
Output = Literal["graph", "edge", "node"]


def _check(values: Sequence[str], allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ValueError(f"{what}: {list(values)} is invalid; choose one or more of {allowed}")
    return tuple(values)


class EdgeUpdate(nn.Module):
    """``e <- LN(e + W_2 act(W_e e + W_s h_src + W_t h_dst))`` (node maps applied per node)."""

    def __init__(self, node_dim: int, edge_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or edge_dim
        self.lin_e = nn.Linear(edge_dim, hidden)
        self.lin_nodes = nn.Linear(node_dim, 2 * hidden, bias=False)
        self.lin_out = nn.Linear(hidden, edge_dim)
        self.act = nn.SiLU()
        self.norm = nn.LayerNorm(edge_dim)

    def forward(self, h: Tensor, e: Tensor, g: GraphBatch) -> Tensor:
        s, t = self.lin_nodes(h).chunk(2, dim=1)
        z = self.lin_e(e) + s.index_select(0, g.src) + t.index_select(0, g.dst)
        return self.norm(e + self.lin_out(self.act(z)))


class GMNLayer(nn.Module):
    """One edge-updating PNA message-passing layer (see the module docstring).

    Args:
        hidden: node feature width (edge features have ``edge_dim``).
        edge_dim: edge feature width (default ``hidden``).
        aggregators: among ``sum, mean, max, min, std``.
        scalers: degree scalers among ``identity, amplification, attenuation``.
        bidirectional: also pass messages against the edge direction.
        update_edges: run the edge update after the node update.
        residual: ``h <- LN(h + MLP(...))`` instead of PNA's ``h <- LN(MLP(...))`` (the input
            ``h`` is part of the MLP's input either way). Off by default: at initialization the
            residual stream (embeddings) drowns the messages, so information from the inputs
            barely reaches the outputs of deep networks.
        dropout: dropout on the node update.
    """

    def __init__(
        self,
        hidden: int,
        edge_dim: int | None = None,
        aggregators: Sequence[str] = ("mean", "min", "max", "std"),
        scalers: Sequence[str] = ("identity", "amplification"),
        bidirectional: bool = True,
        update_edges: bool = True,
        residual: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        edge_dim = edge_dim or hidden
        self.residual = residual
        self.aggregators = _check(aggregators, AGGREGATORS, "aggregators")
        self.scalers = _check(scalers, SCALERS, "scalers")
        self.bidirectional = bidirectional
        dirs = 2 if bidirectional else 1
        # per direction: node maps A (sender) and B (receiver), edge FiLM (scale, shift)
        self.msg_nodes = nn.Linear(hidden, 2 * dirs * hidden)
        self.msg_edge = nn.Linear(edge_dim, 2 * dirs * hidden)
        width = hidden * (1 + dirs * len(self.aggregators) * len(self.scalers))
        self.update = nn.Sequential(
            nn.Linear(width, hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden)
        )
        self.norm = nn.LayerNorm(hidden)
        self.edge_update = EdgeUpdate(hidden, edge_dim) if update_edges else None

    def _aggregate(
        self, scale: Tensor, shift: Tensor, sender_x: Tensor, receiver_x: Tensor,
        sender: Tensor, ptr: Tensor, rows: Tensor | None, avg: float,
    ) -> Tensor:  # fmt: skip
        """PNA aggregation of the messages ``scale * (sender_x[sender] + receiver_x) + shift``
        per receiving node (never stored: :func:`metanet.ops.film_multi_aggregate`)."""
        return ops.film_multi_aggregate(
            scale, shift, sender_x, receiver_x, sender, ptr, rows=rows, aggrs=self.aggregators,
            scalers=self.scalers, avg_log_degree=avg,
        )  # fmt: skip

    def forward(
        self, h: Tensor, e: Tensor, g: GraphBatch, avg_log_degree: float
    ) -> tuple[Tensor, Tensor]:
        """``h [N, hidden], e [E, edge_dim] -> (h', e')``."""
        node_parts = self.msg_nodes(h).chunk(4 if self.bidirectional else 2, dim=1)
        film = self.msg_edge(e).chunk(4 if self.bidirectional else 2, dim=1)
        # forward direction: src j sends to dst i, m = s(e) * (A h_j + B h_i) + t(e)
        inbound = self._aggregate(film[0], film[1], node_parts[0], node_parts[1], g.src,
                                  g.dst_ptr, None, avg_log_degree)  # fmt: skip
        aggs = [h, inbound]
        if self.bidirectional:  # against the edges: dst sends to src, edges read in src order
            outbound = self._aggregate(
                film[2], film[3], node_parts[2], node_parts[3], g.rev_dst, g.src_ptr,
                g.src_perm, avg_log_degree,
            )  # fmt: skip
            aggs.append(outbound)
        u = self.update(torch.cat(aggs, dim=1))
        h = self.norm(h + u if self.residual else u)
        if self.edge_update is not None:
            e = self.edge_update(h, e, g)
        return h, e


class GMN(GraphMetanetwork):
    """Graph metanetwork over :class:`~metanet.graph.ParamGraph` batches of any architecture.

    ``forward(batch)`` returns ``[num_graphs, out_dim]`` (``output="graph"``, invariant),
    ``[E, edge_out_dim]`` per-weight predictions (``output="edge"``, equivariant; map them back
    to state_dicts with ``ParamGraph.state_dicts_from_batch(batch, edge_values=...)``) or
    ``[N, node_out_dim]`` (``output="node"``).

    Args:
        node_in_dim: columns of ``x`` (default 3, the ParamGraph's node features).
        edge_in_dim: columns of ``edge_attr`` (default 9, ``from_module``'s max kernel size).
        hidden: node feature width.
        num_layers: message-passing layers.
        out_dim: output width for ``output="graph"``.
        edge_dim: edge feature width (default ``hidden``).
        aggregators, scalers: PNA multi-aggregation (see :class:`GMNLayer`).
        bidirectional: messages in both edge directions.
        update_edges: edge updates in every layer (always on for ``output="edge"``; the last
            layer's only when edges are read out).
        residual: residual node updates (see :class:`GMNLayer`).
        avg_log_degree: PNA's ``delta`` (mean ``log(deg + 1)`` of the training graphs' nodes,
            in- and out-degrees with ``bidirectional``); ``None`` takes it from the data
            statistics (:meth:`set_data_statistics` / :meth:`calibrate`) and keeps it (a
            buffer).
        fourier_features, fourier_sigma: random Fourier encoding of node/edge values (0: linear).
        max_layers, max_positions: embedding sizes (depth; input/output indices).
        probe_dim: width of ``graph.probe`` probe features (0: none).
        standardize: standardize node/edge values per type (``True`` / ``"type"``) or per type
            and depth (``"layer"``) with the statistics of the training graphs (see
            :class:`metanet.nn.graph_features.Standardizer` and
            :class:`metanet.nn.readout.GraphMetanetwork`).
        node_pool, edge_pool, output_slots, head_layers: the :class:`GraphReadout`.
        output: ``"graph"``, ``"edge"`` or ``"node"``.
        edge_out_dim, node_out_dim: output widths of the edge / node heads.
        dropout: dropout in the node updates and readout.
    """

    input_kind = "graph"

    def __init__(
        self,
        node_in_dim: int | None = None,
        edge_in_dim: int | None = None,
        hidden: int = 64,
        num_layers: int = 4,
        out_dim: int = 1,
        edge_dim: int | None = None,
        aggregators: Sequence[str] = ("mean", "min", "max", "std"),
        scalers: Sequence[str] = ("identity", "amplification"),
        bidirectional: bool = True,
        update_edges: bool = True,
        residual: bool = False,
        avg_log_degree: float | None = None,
        fourier_features: int = 0,
        fourier_sigma: float = 1.0,
        max_layers: int = 64,
        max_positions: int = 1024,
        probe_dim: int = 0,
        standardize: bool | str = True,
        node_pool: Sequence[str] = ("mean", "max"),
        edge_pool: Sequence[str] = ("mean",),
        output_slots: int = 0,
        head_layers: int = 2,
        output: Output = "graph",
        edge_out_dim: int = 1,
        node_out_dim: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        edge_dim = edge_dim or hidden
        self.bidirectional = bidirectional
        self._build_encoders(
            hidden, edge_dim, node_in_dim, edge_in_dim, num_layers, fourier_features,
            fourier_sigma, max_layers, max_positions, probe_dim, standardize, output,
        )  # fmt: skip
        self.layers = nn.ModuleList(
            GMNLayer(
                hidden,
                edge_dim,
                aggregators,
                scalers,
                bidirectional,
                update_edges=self._layer_updates_edges(i, num_layers, update_edges, edge_pool),
                residual=residual,
                dropout=dropout,
            )  # fmt: skip
            for i in range(num_layers)
        )
        self._fixed_delta = avg_log_degree is not None
        init = math.nan if avg_log_degree is None else float(avg_log_degree)
        self.register_buffer("avg_log_degree", torch.tensor(init))
        self._build_head(
            hidden, edge_dim, node_pool, edge_pool, output_slots, head_layers, out_dim,
            edge_out_dim, node_out_dim, dropout, nn.SiLU,
        )  # fmt: skip

    def _degree_calibrated(self) -> bool:
        return not bool(torch.isnan(self.avg_log_degree))

    def _set_degree_statistics(self, stats: GraphStats) -> None:
        if not self._fixed_delta:
            delta = max(stats.avg_log_degree(self.bidirectional), 1e-3)
            self.avg_log_degree.fill_(delta)

    def embed(self, batch: object) -> tuple[Tensor, Tensor, GraphBatch]:
        """Final node ``[N, hidden]`` and edge ``[E, edge_dim]`` features of a batch."""
        g = read_batch(batch, reverse=self.bidirectional)
        self._ensure_calibrated(g)
        delta = float(self.avg_log_degree)
        h, e = self.nodes(g), self.edges(g)
        for layer in self.layers:
            h, e = layer(h, e, g, delta)
        return h, e, g


class NGGNN(GMN):
    """NG-GNN (Kofinas et al. 2024) defaults: forward-only PNA messages (mean/min/max/std,
    identity/amplification scalers), edge updates, random Fourier features of the values, and a
    readout that reads the output neurons in order (``output_slots``) next to mean pooling.

    Same arguments as :class:`GMN` (only the defaults differ).
    """

    def __init__(
        self,
        node_in_dim: int | None = None,
        edge_in_dim: int | None = None,
        hidden: int = 64,
        num_layers: int = 4,
        out_dim: int = 1,
        bidirectional: bool = False,
        fourier_features: int = 64,
        output_slots: int = 10,
        node_pool: Sequence[str] = ("mean",),
        edge_pool: Sequence[str] = (),
        **kwargs: object,
    ) -> None:
        super().__init__(
            node_in_dim, edge_in_dim, hidden, num_layers, out_dim,
            bidirectional=bidirectional, fourier_features=fourier_features,
            output_slots=output_slots, node_pool=node_pool, edge_pool=edge_pool,
            **kwargs,  # type: ignore[arg-type]
        )  # fmt: skip
