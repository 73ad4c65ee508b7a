"""NG-T: the relational transformer of Neural Graphs (Kofinas et al. 2024) on sparse ParamGraphs.

Attention of node ``i`` over the edges ``j -> i`` into it, with edge features ``e_ij``
modulating queries, keys and values (NG's relational attention, after Diao & Loynd 2023)::

    q_ij = W_q h_i + Q e_ij        k_ij = W_k h_j + K e_ij
    v_ij = (W_v h_j) * V1 e_ij + V0 e_ij          (``modulate_v``; else W_v h_j + V0 e_ij)
    a_ij = softmax_j(<q_ij, k_ij> / sqrt(d_head))  per head, over the incoming edges of i
    out_i = W_o sum_j a_ij v_ij

The softmax runs over each node's incoming edges only (:func:`metanet.ops.relational_attention`;
NG's dense version attends over all node pairs with zero features for missing edges). With
``bidirectional`` a second attention runs over outgoing edges. A layer is
``h <- LN(h + W [attn_in, attn_out]); h <- LN(h + MLP(h))`` followed by the edge update
``e <- LN(e + W_2 act(W_e e + W_s h_j + W_t h_i)); e <- LN(e + MLP(e))``.
All maps act per node / per edge or aggregate over neighbour sets: node and edge outputs are
equivariant, the pooled readout is invariant to hidden-neuron permutations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from metanet import ops
from metanet.nn.gmn import EdgeUpdate, Output
from metanet.nn.graph_features import GraphBatch, read_batch
from metanet.nn.readout import GraphMetanetwork


class RelationalAttention(nn.Module):
    """Edge-modulated multi-head attention over incoming (or, ``reverse``, outgoing) edges.

    Args:
        hidden: node width (``heads`` must divide it).
        edge_dim: edge width.
        heads: attention heads.
        modulate_v: multiply the values by an edge projection (NG's ``modulate_v``).
        reverse: attend over outgoing instead of incoming edges.
    """

    def __init__(
        self, hidden: int, edge_dim: int, heads: int, modulate_v: bool = True,
        reverse: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden={hidden} must be divisible by heads={heads}")
        self.heads, self.d_head = heads, hidden // heads
        self.modulate_v, self.reverse = modulate_v, reverse
        self.qkv_node = nn.Linear(hidden, 3 * hidden, bias=False)
        self.qkv_edge = nn.Linear(edge_dim, (4 if modulate_v else 3) * hidden, bias=False)
        self.scale = 1.0 / math.sqrt(self.d_head)

    def forward(self, h: Tensor, e: Tensor, g: GraphBatch) -> Tensor:
        """``h [N, hidden], e [E, edge_dim] -> [N, hidden]`` (heads concatenated)."""
        if self.reverse:  # outgoing edges: segments by source, edge terms read in that order
            send, ptr, rows = g.rev_dst, g.src_ptr, g.src_perm
        else:
            send, ptr, rows = g.src, g.dst_ptr, None
        return ops.relational_attention(
            self.qkv_node(h), self.qkv_edge(e), send, ptr, self.heads, rows=rows,
            scale=self.scale,
        )  # fmt: skip


class NGTLayer(nn.Module):
    """One relational-transformer layer: attention, node MLP, optional edge update.

    Args:
        hidden, edge_dim, heads: widths and heads.
        node_mlp, edge_mlp: hidden widths of the node / edge MLPs (default 2x the width).
        bidirectional: attend over outgoing edges too.
        update_edges: run the edge update.
        modulate_v: see :class:`RelationalAttention`.
        dropout: dropout on the residual branches.
    """

    def __init__(
        self,
        hidden: int,
        edge_dim: int,
        heads: int,
        node_mlp: int | None = None,
        edge_mlp: int | None = None,
        bidirectional: bool = True,
        update_edges: bool = True,
        modulate_v: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn = nn.ModuleList([RelationalAttention(hidden, edge_dim, heads, modulate_v)])
        if bidirectional:
            self.attn.append(RelationalAttention(hidden, edge_dim, heads, modulate_v, True))
        self.attn_out = nn.Linear(len(self.attn) * hidden, hidden)
        self.drop = nn.Dropout(dropout)
        self.ln0, self.ln1 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        node_mlp = node_mlp or 2 * hidden
        self.node_mlp = nn.Sequential(
            nn.Linear(hidden, node_mlp), nn.GELU(), nn.Linear(node_mlp, hidden), nn.Dropout(dropout)
        )
        self.edge_update = self.edge_mlp = self.eln = None
        if update_edges:
            edge_mlp = edge_mlp or 2 * edge_dim
            self.edge_update = EdgeUpdate(hidden, edge_dim, edge_mlp)
            self.edge_mlp = nn.Sequential(
                nn.Linear(edge_dim, edge_mlp), nn.GELU(), nn.Linear(edge_mlp, edge_dim),
                nn.Dropout(dropout),
            )  # fmt: skip
            self.eln = nn.LayerNorm(edge_dim)

    def forward(self, h: Tensor, e: Tensor, g: GraphBatch) -> tuple[Tensor, Tensor]:
        a = torch.cat([attn(h, e, g) for attn in self.attn], dim=1)
        h = self.ln0(h + self.drop(self.attn_out(a)))
        h = self.ln1(h + self.node_mlp(h))
        if self.edge_update is not None:
            e = self.edge_update(h, e, g)
            e = self.eln(e + self.edge_mlp(e))
        return h, e


class NGT(GraphMetanetwork):
    """NG-T over :class:`~metanet.graph.ParamGraph` batches of any architecture.

    ``forward(batch)`` returns ``[num_graphs, out_dim]`` (``output="graph"``), per-weight
    ``[E, edge_out_dim]`` (``output="edge"``) or ``[N, node_out_dim]`` (``output="node"``).

    Args:
        node_in_dim: columns of ``x`` (default 3); edge_in_dim: columns of ``edge_attr``
            (default 9).
        hidden: node width; edge_dim: edge width (NG: 64 and 32).
        num_layers, heads: transformer depth and heads.
        out_dim: output width for ``output="graph"``.
        node_mlp, edge_mlp: MLP hidden widths (default 2x).
        bidirectional: attend over outgoing edges too.
        update_edges: edge updates (the last layer's only when edges are read out).
        modulate_v: edge-modulated values.
        fourier_features, fourier_sigma, max_layers, max_positions, probe_dim, standardize:
            the encoders (see :class:`metanet.nn.graph_features.NodeEncoder`); the value
            statistics come from :meth:`set_data_statistics` / :meth:`calibrate` (see
            :class:`metanet.nn.readout.GraphMetanetwork`).
        node_pool, edge_pool, output_slots, head_layers: the :class:`GraphReadout`.
        output, edge_out_dim, node_out_dim: which head (see :class:`metanet.nn.gmn.GMN`).
        dropout: residual-branch dropout.
    """

    input_kind = "graph"

    def __init__(
        self,
        node_in_dim: int | None = None,
        edge_in_dim: int | None = None,
        hidden: int = 64,
        edge_dim: int = 32,
        num_layers: int = 4,
        heads: int = 4,
        out_dim: int = 1,
        node_mlp: int | None = None,
        edge_mlp: int | None = None,
        bidirectional: bool = True,
        update_edges: bool = True,
        modulate_v: bool = True,
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
        self.bidirectional = bidirectional
        self._build_encoders(
            hidden, edge_dim, node_in_dim, edge_in_dim, num_layers, fourier_features,
            fourier_sigma, max_layers, max_positions, probe_dim, standardize, output,
        )  # fmt: skip
        self.layers = nn.ModuleList(
            NGTLayer(
                hidden,
                edge_dim,
                heads,
                node_mlp,
                edge_mlp,
                bidirectional,
                update_edges=self._layer_updates_edges(i, num_layers, update_edges, edge_pool),
                modulate_v=modulate_v,
                dropout=dropout,
            )  # fmt: skip
            for i in range(num_layers)
        )
        self._build_head(
            hidden, edge_dim, node_pool, edge_pool, output_slots, head_layers, out_dim,
            edge_out_dim, node_out_dim, dropout, nn.GELU,
        )  # fmt: skip

    def embed(self, batch: object) -> tuple[Tensor, Tensor, GraphBatch]:
        """Final node ``[N, hidden]`` and edge ``[E, edge_dim]`` features of a batch."""
        g = read_batch(batch, reverse=self.bidirectional)
        self._ensure_calibrated(g)
        h, e = self.nodes(g), self.edges(g)
        for layer in self.layers:
            h, e = layer(h, e, g)
        return h, e, g
