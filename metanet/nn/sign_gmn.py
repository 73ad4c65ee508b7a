"""Sign-equivariant graph metanetwork (the sign case of ScaleGMN, Kalogeropoulos et al. 2024).

Networks whose hidden activations are odd (sine, tanh) have a symmetry beyond permutations:
negating hidden neuron ``i``'s bias, incoming and outgoing weights (``b_i -> s_i b_i``,
``w_ij -> s_i s_j w_ij``, ``s in {-1, +1}``, ``s = 1`` for input and output neurons) leaves the
function unchanged. A SIREN 2-32-32-1 has ``2^64`` sign-equivalent copies of every weight
vector on top of its permutations, and a permutation-equivariant metanetwork has to learn each
one as a different input. :class:`SignGMN` is invariant to both by construction.

Node states of fixed neurons (inputs, outputs: ``s = 1``) are *invariant*; node states of
hidden neurons (and their flattened positions) are *sign-equivariant* (``h_i -> s_i h_i``);
edge states carry ``s_i s_j``. Every map keeps these types:

* **encoders**: hidden node ``h_i = b_i / r * a[layer]`` and edge ``e_ij = V(w_ij / r) *
  (1 + c[type, layer])`` with no bias (``r``: the training graphs' root mean square of that
  value per type and depth, a positive scale, never a shift); fixed nodes get any invariant
  embedding of their bias, type and position (:class:`~metanet.nn.graph_features.NodeEncoder`);
* **messages** ``j -> i``: ``m_ij = (P e_ij) * (A h_j)`` (sign ``s_i s_j s_j = s_i``), mean over
  the in-edges of ``i``; backward messages ``(P' e_ij) * (A' h_i)`` mean over the out-edges of
  ``j`` (sign ``s_j``). Only sum/mean: max/min of equivariant values are not equivariant;
* **node update** ``z = U [h, m_fwd, m_bwd]`` (no bias on hidden nodes), gated by an invariant:
  ``z * sigmoid(G |z| + g[type, layer])``; residual, then an RMS norm (no mean subtraction);
* **edge update** ``e_ij <- e_ij + L((B h_i) * (C h_j))`` (sign ``s_i s_j``), RMS norm;
* **readout** (invariant): the states of the output and input neurons in order, and per graph
  the mean of ``|h|`` over nodes and of ``|e|`` over edges, into an MLP.

Supported parameter graphs: Linear / conv / flatten edges between input, hidden, output and
flatten nodes (MLPs, SIRENs, plain CNNs with a flatten head). A graph with norm, attention,
residual or other nodes is refused with a one-line error: their parameters transform
differently under sign flips. With ReLU networks sign flips are not a symmetry; the model is
then simply more constrained than :class:`~metanet.nn.gmn.GMN`.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from metanet import ops
from metanet.graph.paramgraph import EdgeType, NodeType
from metanet.nn.graph_features import (
    STAT_LAYERS,
    GraphBatch,
    GraphStats,
    NodeEncoder,
    UncalibratedWarning,
    check_value_widths,
    layer_keys,
    read_batch,
)
from metanet.nn.layers import mlp_head
from metanet.nn.readout import fixed_node_features

SIGN_NODE_TYPES = (NodeType.INPUT, NodeType.HIDDEN, NodeType.OUTPUT, NodeType.FLATTEN)
_FIXED_TYPES = (NodeType.INPUT, NodeType.OUTPUT)
AGGREGATIONS = ("mean", "sum")


def check_sign_graph(g: GraphBatch) -> None:
    """Refuse graphs with nodes whose parameters do not transform as ``b -> s b`` (norm,
    attention, residual sums, ...): :class:`SignGMN` would not be invariant on them.

    Raises:
        ValueError: naming the first unsupported node type.
    """
    allowed = torch.zeros(len(NodeType), dtype=torch.bool, device=g.node_type.device)
    allowed[list(SIGN_NODE_TYPES)] = True
    bad = ~allowed[g.node_type]
    if bool(bad.any()):
        kind = NodeType(int(g.node_type[bad][0])).name
        raise ValueError(
            f"SignGMN reads MLP / SIREN / plain CNN graphs (node types "
            f"{[t.name for t in SIGN_NODE_TYPES]}); this batch has {kind} nodes"
        )


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """``x / rms(x) * weight`` over the last dimension: a positive rescaling, so it commutes
    with sign flips (LayerNorm's mean subtraction would not)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class ValueScale(nn.Module):
    """Per-(type, depth) root mean square of node or edge values of the training graphs, to
    divide by: a positive scale that keeps the sign of every value.

    Args:
        num_types: node or edge types; dim: value columns.
    """

    def __init__(self, num_types: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("rms", torch.ones(num_types * STAT_LAYERS, dim))
        self.register_buffer("calibrated", torch.tensor(False))

    @property
    def is_calibrated(self) -> bool:
        return bool(self.calibrated)

    @torch.no_grad()
    def set_statistics(self, mean: Tensor, std: Tensor) -> None:
        """From per-(type, depth) ``mean`` / ``std`` (``GraphStats.*_layer_mean / _std``)."""
        if tuple(mean.shape) != tuple(self.rms.shape):
            raise ValueError(
                f"statistics of shape {tuple(mean.shape)} do not fit {tuple(self.rms.shape)} "
                "([types * depths, value columns])"
            )
        rms = (mean.pow(2) + std.pow(2)).sqrt()
        self.rms.copy_(torch.where(rms > 1e-8, rms, torch.ones_like(rms)))
        self.calibrated.fill_(True)

    def forward(self, v: Tensor, keys: Tensor) -> Tensor:
        return v / self.rms[keys]


class SignGMNLayer(nn.Module):
    """One sign-equivariant message-passing layer (see the module docstring).

    Args:
        hidden: node state width; edge_dim: edge state width.
        aggregation: ``"mean"`` or ``"sum"`` over each neighbour set.
        update_edges: run the edge update after the node update.
    """

    def __init__(
        self, hidden: int, edge_dim: int, aggregation: str = "mean", update_edges: bool = True
    ) -> None:
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.aggregation = aggregation
        self.msg_edge = nn.Linear(edge_dim, 2 * hidden, bias=False)  # P (forward), P' (backward)
        self.msg_node = nn.Linear(hidden, 2 * hidden, bias=False)  # A (sender j), A' (receiver i)
        self.update = nn.Linear(3 * hidden, hidden, bias=False)
        self.fixed_bias = nn.Parameter(torch.zeros(hidden))  # invariant nodes only
        self.gate = nn.Linear(hidden, hidden)
        self.gate_emb = nn.Embedding(len(NodeType) * STAT_LAYERS, hidden)
        nn.init.zeros_(self.gate_emb.weight)
        self.node_norm = nn.Parameter(torch.ones(hidden))
        self.edge_update = None
        if update_edges:
            self.edge_nodes = nn.Linear(hidden, 2 * edge_dim, bias=False)  # B (dst i), C (src j)
            self.edge_update = nn.Linear(edge_dim, edge_dim, bias=False)
            self.edge_norm = nn.Parameter(torch.ones(edge_dim))

    def _reduce(self, m: Tensor, ptr: Tensor) -> Tensor:
        return ops.segment(m, ptr, reduce=self.aggregation)

    def forward(
        self, h: Tensor, e: Tensor, g: GraphBatch, fixed: Tensor, keys: Tensor, gate_offset: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``h [N, hidden], e [E, edge_dim] -> (h', e')``. ``fixed [N, 1]`` is 1 on invariant
        nodes, ``keys [N]`` are the nodes' (type, depth) keys, ``gate_offset [N, hidden]`` an
        invariant per-node offset of the gate (positions of fixed-position nodes)."""
        p_fwd, p_bwd = self.msg_edge(e).chunk(2, dim=1)
        a_src, a_dst = self.msg_node(h).chunk(2, dim=1)
        # forward: j = src sends to i = dst (edges are dst-sorted)
        forward_msg = self._reduce(p_fwd * a_src.index_select(0, g.src), g.dst_ptr)
        # backward: i = dst sends to j = src (edges re-sorted by src)
        perm = g.src_perm
        backward_msg = self._reduce(
            p_bwd.index_select(0, perm) * a_dst.index_select(0, g.rev_dst), g.src_ptr
        )
        z = self.update(torch.cat([h, forward_msg, backward_msg], dim=1)) + fixed * self.fixed_bias
        z = z * torch.sigmoid(self.gate(z.abs()) + self.gate_emb(keys) + gate_offset)
        h = rms_norm(h + z, self.node_norm)
        if self.edge_update is not None:
            b_dst, c_src = self.edge_nodes(h).chunk(2, dim=1)
            pair = b_dst.index_select(0, g.dst) * c_src.index_select(0, g.src)
            e = rms_norm(e + self.edge_update(pair), self.edge_norm)
        return h, e


class SignGMN(nn.Module):
    """Graph metanetwork invariant to hidden-neuron permutations *and* sign flips.

    ``forward(batch)`` takes a PyG ``Batch`` of :class:`~metanet.graph.ParamGraph` (MLPs,
    SIRENs, plain CNNs; see the module docstring) and returns ``[num_graphs, out_dim]``.

    Args:
        node_in_dim: columns of ``x`` (default 3, the ParamGraph's node features).
        edge_in_dim: columns of ``edge_attr`` (default 9, ``from_module``'s max kernel size).
        hidden: node state width.
        num_layers: message-passing layers.
        out_dim: output width.
        edge_dim: edge state width (default ``hidden``).
        aggregation: ``"mean"`` or ``"sum"`` of the messages.
        update_edges: edge updates (the last layer's only when edges are pooled).
        input_slots, output_slots: read the first input / output neurons' states in order.
        head_layers: hidden layers of the readout MLP.
        max_positions: size of the fixed nodes' position embedding.
        dropout: dropout in the readout MLP.
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
        aggregation: str = "mean",
        update_edges: bool = True,
        input_slots: int = 8,
        output_slots: int = 16,
        head_layers: int = 2,
        max_positions: int = 1024,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        edge_dim = edge_dim or hidden
        self.node_in_dim = 3 if node_in_dim is None else node_in_dim
        self.edge_in_dim = 9 if edge_in_dim is None else edge_in_dim
        self.input_slots, self.output_slots = input_slots, output_slots
        # invariant embedding of fixed nodes (bias, type, depth, position), standardized per layer
        self.fixed_nodes = NodeEncoder(hidden, self.node_in_dim, max_positions=max_positions,
                                       standardize="layer")  # fmt: skip
        self.node_scale = ValueScale(len(NodeType), self.node_in_dim)
        self.edge_scale = ValueScale(len(EdgeType), self.edge_in_dim)
        self.bias_emb = nn.Embedding(len(NodeType) * STAT_LAYERS, hidden)  # a[type, layer]
        # invariant per-position gate offsets of fixed-position nodes (flattened positions of
        # a channel are told apart by it; their states are sign-equivariant, so no additive
        # embedding may reach them)
        self.max_positions = max_positions
        self.pos_gate = nn.Embedding(len(NodeType) * max_positions, hidden)
        nn.init.zeros_(self.pos_gate.weight)
        self.edge_values = nn.Linear(self.edge_in_dim, edge_dim, bias=False)  # V
        self.edge_gain = nn.Embedding(len(EdgeType) * STAT_LAYERS, edge_dim)  # c[type, layer]
        nn.init.zeros_(self.edge_gain.weight)
        self.layers = nn.ModuleList(
            SignGMNLayer(hidden, edge_dim, aggregation, update_edges) for _ in range(num_layers)
        )
        width = 2 * hidden + edge_dim + hidden * (input_slots + output_slots)
        self.head = mlp_head(width, hidden, out_dim, head_layers, dropout, nn.SiLU)

    # -- data statistics ----------------------------------------------------------------------
    @property
    def is_calibrated(self) -> bool:
        """Whether the value scales of the training graphs are set (or loaded)."""
        return (
            self.node_scale.is_calibrated
            and self.edge_scale.is_calibrated
            and self.fixed_nodes.standardize.is_calibrated  # built with standardize="layer"
        )

    @torch.no_grad()
    def set_data_statistics(self, stats: GraphStats) -> None:
        """Use the training graphs' per-(type, depth) value statistics (``GraphStats`` with
        layer statistics, e.g. ``ParamGraphDataModule.graph_stats``).

        Raises:
            ValueError: widths differ from ``node_in_dim`` / ``edge_in_dim``, or no per-layer
                statistics.
        """
        check_value_widths(stats, self.node_in_dim, self.edge_in_dim)
        if not stats.has_layer_stats:
            raise ValueError("SignGMN needs per-layer GraphStats (collected with node depths)")
        self.fixed_nodes.standardize.set_statistics(stats.node_layer_mean, stats.node_layer_std)
        self.node_scale.set_statistics(stats.node_layer_mean, stats.node_layer_std)
        self.edge_scale.set_statistics(stats.edge_layer_mean, stats.edge_layer_std)

    @torch.no_grad()
    def calibrate(self, batch: object) -> None:
        """Set the data statistics from ``batch`` (a representative batch of training graphs)."""
        self.set_data_statistics(GraphStats.from_graphs([read_batch(batch)]))

    # -- forward ------------------------------------------------------------------------------
    def embed(self, batch: object) -> tuple[Tensor, Tensor, GraphBatch]:
        """Final node ``[N, hidden]`` and edge ``[E, edge_dim]`` states of a batch (node states
        of hidden neurons sign-equivariant, of fixed neurons invariant)."""
        g = read_batch(batch, reverse=True)
        check_sign_graph(g)
        if not self.is_calibrated:
            warnings.warn(
                "SignGMN has no data statistics (value scales); calibrating on this batch. Call "
                "model.set_data_statistics(datamodule.graph_stats) first (metanet's tasks do).",
                UncalibratedWarning,
                stacklevel=2,
            )
            self.calibrate(g)
        node_keys = layer_keys(g.node_type, g.node_layer)
        edge_keys = layer_keys(g.edge_type, g.node_layer[g.dst])
        fixed = torch.zeros_like(g.node_type, dtype=torch.bool)
        for t in _FIXED_TYPES:
            fixed |= g.node_type == t
        fixed_f = fixed.unsqueeze(1).to(g.x.dtype)
        bias = self.node_scale(g.x, node_keys)[:, :1]  # hidden neurons: the bias column only
        h_hidden = bias * self.bias_emb(node_keys)
        h = torch.where(fixed.unsqueeze(1), self.fixed_nodes(g), h_hidden)
        e = self.edge_values(self.edge_scale(g.edge_attr, edge_keys))
        e = e * (1 + self.edge_gain(edge_keys))
        positioned = (g.node_pos >= 0).unsqueeze(1).to(h.dtype)
        pos = g.node_type * self.max_positions + g.node_pos.clamp(0, self.max_positions - 1)
        gate_offset = self.pos_gate(pos) * positioned  # [N, hidden], invariant
        for layer in self.layers:
            h, e = layer(h, e, g, fixed_f, node_keys, gate_offset)
        return h, e, g

    def forward(self, batch: object) -> Tensor:
        h, e, g = self.embed(batch)
        parts = [
            ops.segment(h.abs(), g.node_ptr, reduce="mean"),
            ops.segment(h.pow(2), g.node_ptr, reduce="mean").add(1e-8).sqrt(),
            ops.segment(e.abs(), g.edge_ptr, reduce="mean"),
        ]
        if self.input_slots:
            parts.append(fixed_node_features(h, g, NodeType.INPUT, self.input_slots))
        if self.output_slots:
            parts.append(fixed_node_features(h, g, NodeType.OUTPUT, self.output_slots))
        return self.head(torch.cat(parts, dim=1))


__all__ = ["SignGMN", "SignGMNLayer", "ValueScale", "check_sign_graph", "rms_norm"]
