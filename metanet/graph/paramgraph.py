"""``ParamGraph``: a neural network's parameters as a graph (PyG ``Data``) with an exact way back.

One node per neuron / channel (input, hidden, output), one edge per weight, extra nodes for
normalization outputs, flattened positions and attention heads (built by
:func:`metanet.graph.from_module`, see :mod:`metanet.graph.tracing` for the constructions).

Stored tensors (``N`` nodes, ``E`` edges, ``K`` = ``max_kernel_size``):

==============  ================  ============================================================
attribute       shape / dtype     meaning
==============  ================  ============================================================
``x``           float ``[N, 3]``  ``[bias, running_mean, running_var]`` (see ``NODE_FEATURES``):
                                  column 0 is the bias of a neuron (Linear/Conv/attention
                                  projection bias, norm shift ``beta``), columns 1-2 the
                                  BatchNorm running statistics (0 elsewhere)
``node_type``   long ``[N]``      :class:`NodeType`
``node_layer``  long ``[N]``      depth: 0 for inputs, +1 for every parametric op on the path
``node_pos``    long ``[N]``      fixed position: index of an input/output neuron or channel,
                                  spatial index of a ``FLATTEN`` node; -1 for permutable nodes
``edge_index``  int32 ``[2, E]``  ``(src, dst)``, sorted by ``dst`` then ``src`` (int64 only for
                                  graphs past 2**31 nodes; metanetworks index with int64)
``edge_attr``   float ``[E, K]``  weight value in column 0 (Linear, attention projections, norm
                                  scale ``gamma``, residual ``alpha``; 1.0 for structural
                                  edges), or the row-major flattened conv kernel zero-padded to
                                  ``K`` columns
``edge_type``   uint8 ``[E]``     :class:`EdgeType` (call ``.long()`` before using it as an index
                                  or an ``nn.Embedding`` input: uint8 indexes as a mask)
``dst_ptr``     long ``[N + 1]``  CSR pointer: edges into node ``v`` are
                                  ``dst_ptr[v]:dst_ptr[v + 1]``
``layout``      ``ParamLayout``   which node/edge rows hold which parameter elements
==============  ================  ============================================================

Storage: every weight is one edge, so a graph's bytes are dominated by its edges: ``K`` values
(4 bytes each in float32), 8 bytes of int32 endpoints and 1 byte of type. With
``max_kernel_size=1`` (every weight a scalar edge; wider kernels are read over kernel-offset
nodes) a large network's graph is about 3.3x the bytes of its float32 parameters (a 100.7 M
parameter MLP, ResNet-18); with the default ``K = 9`` a network of 3x3 convs is less (ResNet-18:
1.9x) and a Linear-heavy one about 11x (its scalar edges are padded to ``K`` columns).
Parameter-to-row maps are stored as runs (no bytes per element) wherever the rows are
consecutive. Figures: ``scripts/bench_archs.py`` in BENCHMARKS.md.

Batches: ``torch_geometric.data.Batch.from_data_list`` works; ``edge_index`` stays dst-sorted
(node offsets grow with the graph index). The collated ``batch.dst_ptr`` holds each graph's
pointer shifted by its edge offset (length ``N_total + num_graphs``); use
:meth:`ParamGraph.batch_dst_ptr` for the global CSR pointer ``[N_total + 1]``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import torch
from torch import Tensor, nn
from torch_geometric.data import Data

NODE_FEATURES: tuple[str, ...] = ("bias", "running_mean", "running_var")
EDGE_TYPE_DTYPE = torch.uint8  # every EdgeType fits a byte


def index_dtype(count: int) -> torch.dtype:
    """The integer dtype a graph stores node or edge indices below ``count`` in: int32, or int64
    past 2**31."""
    return torch.int32 if count < (1 << 31) else torch.long


NODE_BIAS, NODE_RUNNING_MEAN, NODE_RUNNING_VAR = 0, 1, 2


class NodeType(IntEnum):
    """Kinds of nodes in a :class:`ParamGraph`."""

    INPUT = 0  # input neuron / channel of the network (fixed position)
    HIDDEN = 1  # output of a Linear / Conv / attention output projection (permutable)
    OUTPUT = 2  # network output neuron / channel (fixed position)
    NORM = 3  # output of a normalization layer: bias = shift, running stats (scale on in-edge)
    FLATTEN = 4  # one spatial position of a channel after flatten (node_pos = spatial index)
    ATTN_QUERY = 5  # query projection neuron of multi-head attention (bias = query bias)
    ATTN_KEY = 6  # key projection neuron
    ATTN_VALUE = 7  # value projection neuron
    ATTN_HEAD = 8  # one attention head (groups its query/key/value neurons)
    SUM = 9  # residual sum of two neuron sets that are both used elsewhere
    GROUP = 10  # one group of a GroupNorm (groups its channels)
    POSITION = 11  # one-hot index of an embedding table that is not the input (position, token
    #                type, a learned token such as ViT's cls token); node_pos = the index
    PRODUCT = 12  # elementwise product of two neuron sets (gated MLP, squeeze-excitation)
    SCALE = 13  # neuron times a per-neuron parameter (layer scale, RMSNorm weight; bias = shift)
    PATCH = 14  # one kernel offset of a channel (a conv wider than max_kernel_size; node_pos)


class EdgeType(IntEnum):
    """Kinds of edges in a :class:`ParamGraph`."""

    LINEAR = 0  # Linear weight w[out, in]
    CONV = 1  # conv kernel w[out, in, *k] (flattened, zero-padded)
    RESIDUAL = 2  # identity edge of a residual add (value = alpha, 1.0 for a plain add)
    NORM = 3  # neuron -> its normalized copy (value = scale gamma, 1.0 without affine)
    FLATTEN = 4  # channel -> one of its spatial positions (value 1.0)
    ATTN_QUERY = 5  # input neuron -> query neuron (W_q)
    ATTN_KEY = 6  # input neuron -> key neuron (W_k)
    ATTN_VALUE = 7  # input neuron -> value neuron (W_v)
    ATTN_OUT = 8  # value neuron -> attention output neuron (W_o)
    ATTN_HEAD = 9  # query/key neuron -> its head, head -> its value neurons (value 1.0)
    ATTN_PAIR = 10  # key neuron j -> query neuron j (their dot product), or a shared value
    #                 neuron -> its copy in one query head (grouped-query attention); value 1.0
    GROUP = 11  # GroupNorm group -> its normalized channels (value 1.0)
    EMBEDDING = 12  # one-hot index -> embedding neuron (value = table entry w[index, neuron])
    PRODUCT = 13  # operand neuron -> product neuron (value 1.0)
    SCALE = 14  # neuron -> its scaled copy (value = the per-neuron scale; 1.0 for a shift)
    PATCH = 15  # channel -> one of its kernel offsets (value 1.0)


class ParamSlot:
    """Where one state_dict tensor lives in the graph.

    ``value.reshape(len(rows), width)`` equals ``source_tensor[rows, col:col + width]``, where
    ``source_tensor`` is ``edge_attr`` (``source == "edge"``) or ``x`` (``source == "node"``).

    The rows are stored compactly: a run of consecutive rows (what every Linear / conv weight
    and most other parameters get, since edges are sorted by destination) as its start and
    length, any other order as an int32 table (int64 past 2**31 rows). :attr:`rows` gives
    them as an int64 tensor; :meth:`take` / :meth:`put` read and write the values without
    materializing a run.
    """

    __slots__ = ("key", "shape", "dtype", "source", "col", "width", "_start", "_count", "_table")

    def __init__(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, source: str,
                 rows: Tensor, col: int, width: int) -> None:  # fmt: skip
        self.key, self.shape, self.dtype, self.source = key, tuple(shape), dtype, source
        self.col, self.width = int(col), int(width)
        rows = rows.reshape(-1)
        self._count = int(rows.numel())
        self._start = int(rows[0]) if self._count else 0
        if self._count <= 1 or bool((rows[1:] - rows[:-1] == 1).all()):
            self._table: Tensor | None = None
        else:
            small = int(rows.max()) < (1 << 31) and int(rows.min()) >= 0
            table = rows.to(device="cpu", dtype=torch.int32 if small else torch.long)
            self._table = table.clone() if table.data_ptr() == rows.data_ptr() else table

    @classmethod
    def run(cls, key: str, shape: tuple[int, ...], dtype: torch.dtype, source: str, start: int,
            count: int, col: int, width: int) -> ParamSlot:  # fmt: skip
        """A slot whose rows are ``start, start + 1, ..., start + count - 1``."""
        slot = cls(key, shape, dtype, source, torch.zeros(0, dtype=torch.long), col, width)
        slot._start, slot._count = int(start), int(count)
        return slot

    @property
    def num_rows(self) -> int:
        """Number of graph rows (``numel // width``)."""
        return self._count

    @property
    def run_start(self) -> int:
        """The first row of a run (see :attr:`is_run`)."""
        return self._start

    @property
    def rows(self) -> Tensor:
        """The graph rows of the tensor's elements (int64 ``[numel // width]``)."""
        if self._table is not None:
            return self._table.long()
        return torch.arange(self._start, self._start + self._count)

    @property
    def is_run(self) -> bool:
        """Whether the rows are one run of consecutive rows (stored as start and length)."""
        return self._table is None

    @property
    def storage_bytes(self) -> int:
        """Bytes this slot's row map holds (0 for a run)."""
        return 0 if self._table is None else self._table.numel() * self._table.element_size()

    def take(self, values: Tensor) -> Tensor:
        """``values[rows, col:col + width]`` (a view for a run of rows)."""
        cols = slice(self.col, self.col + self.width)
        if self._table is None:
            return values[self._start : self._start + self._count, cols]
        return values[self._table.to(values.device).long(), cols]

    def put(self, values: Tensor, part: Tensor) -> None:
        """Write ``part`` (``[len(rows), width]``) into ``values[rows, col:col + width]``."""
        cols = slice(self.col, self.col + self.width)
        if self._table is None:
            values[self._start : self._start + self._count, cols] = part
        else:
            values[self._table.to(values.device).long(), cols] = part

    def __repr__(self) -> str:
        where = (f"rows {self._start}..{self._start + self._count - 1}" if self._table is None
                 else f"{self._count} rows")  # fmt: skip
        return (f"ParamSlot({self.key!r}, shape={self.shape}, {self.source} {where}, "
                f"cols {self.col}..{self.col + self.width - 1})")  # fmt: skip

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ParamSlot):
            return NotImplemented
        return (
            (self.key, self.shape, self.dtype, self.source, self.col, self.width)
            == (other.key, other.shape, other.dtype, other.source, other.col, other.width)
            and torch.equal(self.rows, other.rows)
        )

    __hash__ = None  # type: ignore[assignment]

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)


@dataclass
class ParamLayout:
    """The map between a graph's node/edge values and the module's state_dict.

    ``extras`` holds state_dict entries that are not graph values (e.g. BatchNorm's
    ``num_batches_tracked`` counter, other buffers); they are copied back verbatim.
    ``meta["tied"]`` maps a key to the key it is tied to (one tensor under two names, e.g.
    GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``): both have slots (the graph has
    edges for both uses) and :meth:`state_dict_from` returns the primary's tensor under both
    keys, so loading it keeps the tie.
    """

    slots: dict[str, ParamSlot]
    extras: dict[str, Tensor]
    keys: list[str]  # state_dict key order
    num_nodes: int
    num_edges: int
    node_dim: int
    edge_dim: int
    module_type: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"ParamLayout({self.module_type}, {len(self.slots)} tensors in graph, "
            f"{len(self.extras)} extra, N={self.num_nodes}, E={self.num_edges})"
        )

    def locate(self, key: str) -> ParamSlot:
        """The :class:`ParamSlot` of state_dict entry ``key`` (KeyError naming it otherwise)."""
        if key not in self.slots:
            raise KeyError(
                f"'{key}' is not a graph value of this layout; known: {list(self.slots)}"
            )
        return self.slots[key]

    def _check_values(self, edge_values: Tensor, node_values: Tensor) -> tuple[Tensor, Tensor]:
        if edge_values.dim() == 1:
            edge_values = edge_values.unsqueeze(1)
        if node_values.dim() == 1:
            node_values = node_values.unsqueeze(1)
        if edge_values.dim() != 2 or edge_values.size(0) != self.num_edges:
            raise ValueError(
                f"edge_values must be [E={self.num_edges}, >=1], got {tuple(edge_values.shape)}"
            )
        if node_values.dim() != 2 or node_values.size(0) != self.num_nodes:
            raise ValueError(
                f"node_values must be [N={self.num_nodes}, >=1], got {tuple(node_values.shape)}"
            )
        return edge_values, node_values

    def state_dict_from(self, edge_values: Tensor, node_values: Tensor) -> OrderedDict:
        """A state_dict (same keys, shapes and dtypes as the module's) read from graph values.

        Args:
            edge_values: ``[E, F]`` edge values laid out like ``edge_attr`` (``[E]`` = one column);
                ``F`` must cover the columns the layout reads (kernel size for conv edges).
            node_values: ``[N, F']`` node values laid out like ``x``.
        Returns:
            ``OrderedDict`` key -> tensor (new tensors on the values' device).
        """
        edge_values, node_values = self._check_values(edge_values, node_values)
        out: OrderedDict[str, Tensor] = OrderedDict()
        tied = self.meta.get("tied", {})
        for key in self.keys:
            if key in tied:
                continue
            if key in self.extras:
                out[key] = self.extras[key].clone()
                continue
            s = self.slots[key]
            src = edge_values if s.source == "edge" else node_values
            if src.size(1) < s.col + s.width:
                raise ValueError(
                    f"'{key}' needs {s.source} value columns {s.col}..{s.col + s.width - 1}, "
                    f"but the {s.source} values have {src.size(1)} columns"
                )
            out[key] = s.take(src).reshape(s.shape).to(s.dtype).clone()
        if tied:
            for alias, primary in tied.items():
                out[alias] = out[primary]
            out = OrderedDict((key, out[key]) for key in self.keys)
        return out

    def write(self, state_dict: Mapping[str, Tensor], x: Tensor, edge_attr: Tensor) -> None:
        """Write ``state_dict``'s graph values into ``x`` / ``edge_attr`` in place.

        Raises:
            ValueError: a missing key or a shape that differs from the layout (naming the key).
        """
        for key, s in self.slots.items():
            if key not in state_dict:
                raise ValueError(f"state_dict is missing '{key}'")
            value = state_dict[key]
            if tuple(value.shape) != s.shape:
                raise ValueError(
                    f"'{key}' has shape {tuple(value.shape)}, the layout expects {s.shape}"
                )
            dst = edge_attr if s.source == "edge" else x
            s.put(dst, value.detach().reshape(-1, s.width).to(device=dst.device, dtype=dst.dtype))


def _ptr(index_sorted: Tensor, size: int) -> Tensor:
    counts = torch.bincount(index_sorted, minlength=size)
    ptr = torch.zeros(size + 1, dtype=torch.long, device=index_sorted.device)
    torch.cumsum(counts, 0, out=ptr[1:])
    return ptr


def check_finite(state_dict: Mapping[str, Tensor], allow_nonfinite: bool) -> None:
    """Raise ValueError naming the first floating tensor with NaN/inf (unless allowed)."""
    if allow_nonfinite:
        return
    for key, value in state_dict.items():
        if torch.is_floating_point(value) and not bool(torch.isfinite(value).all()):
            raise ValueError(
                f"parameter '{key}' has non-finite values (NaN or inf); "
                "pass allow_nonfinite=True to keep them"
            )


class ParamGraph(Data):
    """A network's parameter graph (see the module docstring for the stored tensors).

    Build with :func:`metanet.graph.from_module`; go back with :meth:`to_state_dict` /
    :meth:`load_into` (bit-exact copies of the parameters), or from a metanetwork's predicted
    values with :meth:`state_dict_from` / :meth:`state_dicts_from_batch`.
    """

    def __inc__(self, key: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        if key == "dst_ptr":
            return int(self.edge_index.size(1))
        return super().__inc__(key, value, *args, **kwargs)

    # ------------------------------------------------------------------ construction
    def with_state_dict(
        self, state_dict: Mapping[str, Tensor], allow_nonfinite: bool = False
    ) -> ParamGraph:
        """A graph of the same structure carrying ``state_dict``'s values (no re-tracing).

        Use it to turn many checkpoints of one architecture into graphs quickly. Structure
        tensors (``edge_index``, types, ...) are shared with ``self``; values are new tensors.
        """
        check_finite(state_dict, allow_nonfinite)
        layout = self._layout()
        x = self.x.clone()
        edge_attr = self.edge_attr.clone()
        layout.write(state_dict, x, edge_attr)
        g = self.__class__()
        for key, value in self:
            g[key] = value
        g.x, g.edge_attr = x, edge_attr
        return g

    # ------------------------------------------------------------------ back to modules
    def _layout(self) -> ParamLayout:
        layout = getattr(self, "layout", None)
        if not isinstance(layout, ParamLayout):
            raise TypeError(
                "this graph has no single ParamLayout (a Batch holds one per graph: use "
                "ParamGraph.state_dicts_from_batch)"
            )
        return layout

    def state_dict_from(
        self, edge_values: Tensor | None = None, node_values: Tensor | None = None
    ) -> OrderedDict:
        """State_dict from (predicted) values; ``None`` keeps this graph's own ``edge_attr`` /
        ``x``. Shapes as in :meth:`ParamLayout.state_dict_from`."""
        return self._layout().state_dict_from(
            self.edge_attr if edge_values is None else edge_values,
            self.x if node_values is None else node_values,
        )

    def to_state_dict(self) -> OrderedDict:
        """The module's state_dict (same keys, shapes, dtypes) from this graph's values."""
        return self.state_dict_from()

    def load_into(self, module: nn.Module) -> nn.Module:
        """Copy this graph's values into ``module`` (bit-exact) and return it.

        Raises:
            ValueError: ``module``'s state_dict keys or shapes differ from the graph's (naming
                the key).
        """
        sd = self.to_state_dict()
        own = module.state_dict()
        missing = [k for k in sd if k not in own]
        unexpected = [k for k in own if k not in sd]
        if missing or unexpected:
            raise ValueError(
                f"module does not match the graph: keys only in graph {missing}, "
                f"only in module {unexpected}"
            )
        for key, value in sd.items():
            if own[key].shape != value.shape:
                raise ValueError(
                    f"'{key}': module shape {tuple(own[key].shape)} != graph {tuple(value.shape)}"
                )
        module.load_state_dict(sd)
        return module

    # ------------------------------------------------------------------ batches
    @staticmethod
    def batch_dst_ptr(batch: Data) -> Tensor:
        """The global CSR pointer ``[N_total + 1]`` over destinations of a batch of ParamGraphs
        (or of a single graph)."""
        ptr = batch.dst_ptr
        node_ptr = getattr(batch, "ptr", None)
        if node_ptr is None:
            return ptr
        num_graphs = node_ptr.numel() - 1
        if ptr.numel() != int(node_ptr[-1]) + num_graphs:
            raise ValueError(
                f"batch.dst_ptr has {ptr.numel()} entries, expected N + num_graphs = "
                f"{int(node_ptr[-1]) + num_graphs}"
            )
        keep = torch.ones(ptr.numel(), dtype=torch.bool, device=ptr.device)
        first = node_ptr[1:-1] + torch.arange(1, num_graphs, device=node_ptr.device)
        keep[first.to(ptr.device)] = False
        return ptr[keep]

    @staticmethod
    def state_dicts_from_batch(
        batch: Data, edge_values: Tensor | None = None, node_values: Tensor | None = None
    ) -> list[OrderedDict]:
        """One state_dict per graph of a ``Batch`` of ParamGraphs, read from (predicted) values.

        Args:
            batch: ``Batch.from_data_list([...ParamGraph])``.
            edge_values: ``[E_total, F]`` (default ``batch.edge_attr``).
            node_values: ``[N_total, F']`` (default ``batch.x``).
        """
        edge_values = batch.edge_attr if edge_values is None else edge_values
        node_values = batch.x if node_values is None else node_values
        layouts = batch.layout if isinstance(batch.layout, list) else [batch.layout]
        node_ptr = getattr(batch, "ptr", None)
        if node_ptr is None:
            node_ptr = torch.tensor([0, batch.num_nodes])
        num_graphs = node_ptr.numel() - 1
        if len(layouts) != num_graphs:
            raise ValueError(f"{len(layouts)} layouts for {num_graphs} graphs")
        if edge_values.size(0) != batch.edge_index.size(1):
            raise ValueError(
                f"edge_values has {edge_values.size(0)} rows, the batch {batch.edge_index.size(1)}"
            )
        if node_values.size(0) != int(node_ptr[-1]):
            raise ValueError(
                f"node_values has {node_values.size(0)} rows, the batch {int(node_ptr[-1])}"
            )
        edge_counts = [lay.num_edges for lay in layouts]
        out = []
        e0 = 0
        for g, lay in enumerate(layouts):
            n0, n1 = int(node_ptr[g]), int(node_ptr[g + 1])
            out.append(
                lay.state_dict_from(edge_values[e0 : e0 + edge_counts[g]], node_values[n0:n1])
            )
            e0 += edge_counts[g]
        return out

    # ------------------------------------------------------------------ inspection
    def to_networkx(self):  # -> networkx.MultiDiGraph
        """A ``networkx.MultiDiGraph`` with node attributes ``x`` (tuple of floats),
        ``node_type`` (int), ``node_type_name``, ``node_layer``, ``node_pos`` and edge
        attributes ``edge_attr`` (tuple of floats), ``edge_type`` (int), ``edge_type_name``."""
        import networkx as nx

        g = nx.MultiDiGraph()
        x = self.x.detach().cpu().tolist()
        nt = self.node_type.cpu().tolist()
        nl = self.node_layer.cpu().tolist()
        npos = self.node_pos.cpu().tolist()
        for i in range(len(x)):
            g.add_node(
                i,
                x=tuple(x[i]),
                node_type=nt[i],
                node_type_name=NodeType(nt[i]).name,
                node_layer=nl[i],
                node_pos=npos[i],
            )
        ei = self.edge_index.cpu().tolist()
        ea = self.edge_attr.detach().cpu().tolist()
        et = self.edge_type.cpu().tolist()
        for k in range(len(et)):
            g.add_edge(
                ei[0][k],
                ei[1][k],
                edge_attr=tuple(ea[k]),
                edge_type=et[k],
                edge_type_name=EdgeType(et[k]).name,
            )
        return g
