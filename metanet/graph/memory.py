"""How much memory :func:`metanet.graph.from_module` will need, estimated from parameter shapes.

The parameter graph has one edge per weight (per kernel for convs) and every edge row is
``max_kernel_size`` values wide, so a large network's graph can be many times the size of the
network itself (VGG-11's 132 M parameters give a graph of ~8 GiB at ``max_kernel_size=9``).
:func:`estimate_graph_memory` counts nodes and edges from the module's layers (O(number of
modules and traced ops), never O(number of weights)) so that :func:`from_module` can refuse a
graph that would not fit before allocating it.

Counts (``K`` = ``max_kernel_size``, ``f`` = bytes per value of the graph's dtype):

* Linear / Conv / functional weights ``[out, in, *k]``: ``out * in`` edges, ``out`` nodes;
* BatchNorm / LayerNorm / GroupNorm over ``C`` channels: ``C`` nodes and edges (+ one node per
  group and ``C`` group edges for GroupNorm with ``1 < groups < C``);
* MultiheadAttention (``E`` = embed_dim, ``H`` heads): ``3E + H`` nodes and
  ``E * (E + kdim + vdim) + 4E`` edges (the output projection counts as a Linear);
* Embedding ``[V, D]`` / Hugging Face Conv1D ``[in, out]``: one edge per entry (``V`` one-hot
  nodes for an Embedding); a conv whose kernel exceeds ``K``: ``in * k`` kernel-offset nodes and
  edges besides its ``out * in * k`` scalar edges; a module's own 1-D parameter (layer scale,
  RMSNorm weight) or ``[1, .., C]`` table (cls token, position embedding): one node and edge
  per element (plus the table's rows);
* input neurons: the first layer's input width; every flatten-like op: at most the widest Linear
  input in nodes and edges; every residual add, token concat or product of two computed values:
  at most the widest layer in nodes, twice that in edges.

Bytes of the finished graph: per node ``3f`` (``x``) + 32 (``node_type``, ``node_layer``,
``node_pos``, ``dst_ptr``); per edge ``K f`` (``edge_attr``) + 9 (int32 ``edge_index``, uint8
``edge_type``); plus 4 per parameter element row of the layout where the rows are not one run
(``ParamSlot``: a Linear's or conv's weight rows are a run and cost nothing) and the module's
buffers.
Building holds more than the result for a while (the builder's edge chunks, the sort
permutation); :attr:`GraphMemoryEstimate.peak_bytes` adds that (see :func:`_peak_bytes`).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from metanet.graph.fx_builder import _first_consumer, _trace, is_hf_conv1d
from metanet.limits import format_bytes, itemsize

__all__ = ["GraphMemoryEstimate", "estimate_graph_memory"]

# per-element costs (bytes) of the tensors of a ParamGraph, besides the value columns
_NODE_LONGS = 4  # node_type, node_layer, node_pos, dst_ptr
_EDGE_INDEX_BYTES = 2 * 4 + 1  # int32 edge_index (2), uint8 edge_type
_ROW_BYTES = 4  # an int32 layout row (parameters whose rows are not one run)
_LONG = 8

_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class GraphMemoryEstimate:
    """Estimated size of a module's parameter graph.

    Attributes:
        module_type: class name of the module.
        num_nodes: estimated node count ``N`` (an upper bound for supported modules, up to the
            flatten / residual allowances).
        num_edges: estimated edge count ``E``.
        edge_dim: ``max_kernel_size`` (width of ``edge_attr``).
        max_kernel: the largest kernel (elements per edge) of the module's weights.
        dtype: value dtype of the graph (``x`` / ``edge_attr``).
        graph_bytes: bytes held by the finished :class:`ParamGraph` (its tensors and layout).
        peak_bytes: bytes held at once while building it (what is checked against the limit).
    """

    module_type: str
    num_nodes: int
    num_edges: int
    edge_dim: int
    max_kernel: int
    dtype: torch.dtype
    graph_bytes: int
    peak_bytes: int

    def describe(self) -> str:
        """``~E edges x K float32 values, ~N nodes; X once built`` (for messages)."""
        dtype = str(self.dtype).replace("torch.", "")
        return (
            f"~{self.num_edges:,} edges x {self.edge_dim} {dtype} values, ~{self.num_nodes:,} "
            f"nodes; {format_bytes(self.graph_bytes)} once built"
        )


@dataclass
class _Counts:
    nodes: int = 0
    edges: int = 0
    rows: int = 0  # layout rows (one long per graph value of a parameter / buffer)
    widest: int = 0  # most neurons of one layer
    widest_in: int = 0  # widest Linear input (bounds a flatten's new neurons)
    max_kernel: int = 1
    layer_edges: list[int] = field(default_factory=list)  # edges added per builder call

    def dense(self, out: int, inp: int, kernel: int, bias: bool) -> None:
        e = out * inp
        self.nodes += out
        self.edges += e
        # weight rows are one run after the sort by destination; bias rows one run of nodes
        self.widest = max(self.widest, out)
        self.max_kernel = max(self.max_kernel, kernel)
        self.layer_edges.append(e)


def _count_module(m: nn.Module, c: _Counts, k: int = 9) -> None:
    """Add the nodes / edges that ``m``'s own parameters contribute (not its children's);
    ``k`` = max_kernel_size (a conv with a larger kernel gets kernel-offset nodes)."""
    if isinstance(m, nn.Embedding) or is_hf_conv1d(m):
        v, d = (int(s) for s in m.weight.shape)  # Embedding [V, D]; Conv1D [in, out]
        c.dense(d, v, 1, getattr(m, "bias", None) is not None)
        c.nodes += v if isinstance(m, nn.Embedding) else 0
        return
    if isinstance(m, nn.MultiheadAttention):
        e, h = int(m.embed_dim), int(m.num_heads)
        ins = e + int(m.kdim) + int(m.vdim)
        c.nodes += 3 * e + h
        c.edges += e * ins + 4 * e
        c.rows += e * ins + (3 * e if m.in_proj_bias is not None else 0)
        c.widest = max(c.widest, e)
        c.layer_edges += [e * e, e * int(m.kdim), e * int(m.vdim), 4 * e]
        return
    weight = getattr(m, "weight", None)
    if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and isinstance(weight, torch.Tensor):
        if isinstance(weight, nn.parameter.UninitializedParameter):
            return
        shape = tuple(weight.shape)
        kernel = math.prod(shape[2:])
        if kernel > k and isinstance(m, nn.modules.conv._ConvNd):
            in_ch = shape[1] * int(m.groups)  # kernel offsets, one edge each from their channel
            c.nodes += in_ch * kernel
            c.edges += in_ch * kernel
            c.dense(shape[0], shape[1] * kernel, 1, m.bias is not None)
            return
        c.dense(shape[0], shape[1], kernel, getattr(m, "bias", None) is not None)
        if isinstance(m, nn.Linear):
            c.widest_in = max(c.widest_in, shape[1])
        return
    if isinstance(m, _NORMS):
        if isinstance(m, nn.GroupNorm):
            ch, groups = int(m.num_channels), int(m.num_groups)
        elif isinstance(m, nn.LayerNorm):
            ch, groups = math.prod(m.normalized_shape), 1
        else:
            ch, groups = int(m.num_features), 1
        c.nodes += ch
        c.edges += ch
        values = sum(
            getattr(m, name, None) is not None
            for name in ("weight", "bias", "running_mean", "running_var")
        )
        c.rows += ch * values
        c.widest = max(c.widest, ch)
        c.layer_edges.append(ch)
        if isinstance(m, nn.GroupNorm) and 1 < groups < ch:
            c.nodes += groups
            c.edges += ch
            c.layer_edges.append(ch)
        return
    for p in m.parameters(recurse=False):  # weights of functional F.linear / F.conv calls
        if p.dim() >= 2 and p.shape[0] == 1:  # a learned token / position table [1, .., C]
            c.nodes += p.numel() // int(p.shape[-1]) + int(p.shape[-1])
            c.edges += p.numel()
            c.rows += p.numel()
            c.layer_edges.append(p.numel())
        elif p.dim() >= 2:
            c.dense(int(p.shape[0]), int(p.shape[1]), math.prod(p.shape[2:]), False)
            c.widest_in = max(c.widest_in, int(p.shape[1]))
        else:  # a per-neuron scale / shift (layer scale, RMSNorm weight): SCALE nodes
            c.nodes += p.numel()
            c.edges += p.numel()
            c.rows += p.numel()
            c.layer_edges.append(p.numel())


def _input_width(gm: fx.GraphModule) -> int:
    """Input neurons: the input width of the first layer the input reaches (0 if unknown)."""
    first = _first_consumer(gm)
    if isinstance(first, tuple):
        return int(first[1][1])
    if isinstance(first, nn.Linear):
        return int(first.in_features)
    if isinstance(first, nn.modules.conv._ConvNd):
        return int(first.in_channels)
    if isinstance(first, nn.MultiheadAttention):
        return int(first.embed_dim)
    if isinstance(first, nn.GroupNorm):
        return int(first.num_channels)
    if isinstance(first, nn.LayerNorm):
        return math.prod(first.normalized_shape)
    if isinstance(first, nn.modules.batchnorm._BatchNorm):
        return int(first.num_features)
    return 0


def _op_counts(gm: fx.GraphModule) -> tuple[int, int]:
    """Numbers of flatten-like ops and of residual adds in the traced graph."""
    flattens = adds = 0
    for n in gm.graph.nodes:
        if n.op == "call_module":
            flattens += isinstance(gm.get_submodule(str(n.target)), nn.Flatten)
        elif n.op == "call_function":
            flattens += n.target is torch.flatten or n.target is torch.reshape
            adds += n.target in _ADD_FUNCTIONS
            adds += n.target in (torch.cat, operator.mul)  # token concat, gated products
        elif n.op == "call_method":
            flattens += n.target in _FLATTEN_METHODS
            adds += n.target in ("add", "sub", "add_", "sub_") or (
                n.target == "mul" and all(isinstance(a, fx.Node) and a.op != "get_attr"
                                          for a in n.args[:2])
            )  # fmt: skip
    return flattens, adds


def _graph_bytes(nodes: int, edges: int, rows: int, k: int, f: int, extra: int) -> int:
    return (
        nodes * (3 * f + _NODE_LONGS * _LONG)
        + _LONG  # dst_ptr has N + 1 entries
        + edges * (k * f + _EDGE_INDEX_BYTES)
        + rows * _ROW_BYTES
        + extra
    )


def _peak_bytes(graph: int, edges: int, layers: list[int], k: int, f: int) -> int:
    """Most bytes held at once while building (compared with measured peaks in the module
    docstring of ``tests/test_limits.py``).

    The builder collects every layer's edges as separate chunks (int32 ``src`` and ``dst``,
    uint8 ``edge_type``; values: ``K f``), about as many bytes as the finished graph.
    :func:`metanet.graph.tracing._finalize` then sorts the edges (int64 sort key, sorted copy
    and permutation: 24 bytes per edge next to the chunks) and moves the chunks into the result
    one at a time (the largest chunk of values held twice). Chunks under 32 MiB come from the C
    heap, whose freed memory is usually not returned to the system while building, so they
    count twice.
    """
    heap_limit = 32 * 1024**2
    retained = 0
    for e in layers:
        retained += sum(b for b in (e * k * f, e * 4, e * 4, e) if b < heap_limit)
    largest = max(layers, default=0)
    return graph + edges * 3 * _LONG + largest * k * f + retained


def estimate_graph_memory(
    module: nn.Module,
    max_kernel_size: int = 9,
    dtype: torch.dtype | None = None,
    traced: fx.GraphModule | None = None,
) -> GraphMemoryEstimate:
    """Estimate the nodes, edges and bytes of ``from_module(module, max_kernel_size=...)``.

    Args:
        module: the network.
        max_kernel_size: width ``K`` of ``edge_attr``.
        dtype: value dtype of the graph (default: the default dtype promoted with the module's
            floating parameters, as :func:`from_module` does).
        traced: the module's ``torch.fx`` trace if already made (flatten ops, residual adds and
            the input width are read from it); traced here when ``None`` (symbolic: no weights
            are copied).

    Returns:
        A :class:`GraphMemoryEstimate`; ``graph_bytes`` is within a factor 1.5 of the finished
        graph's bytes for the supported constructions, ``peak_bytes`` of what building holds.

    Raises:
        UnsupportedOpError: ``traced`` is ``None`` and torch.fx cannot trace ``module``.
    """
    if dtype is None:
        dtype = torch.get_default_dtype()
        for t in module.state_dict().values():
            if torch.is_floating_point(t):
                dtype = torch.promote_types(dtype, t.dtype)
    if traced is None:
        traced = _trace(module)
    c = _Counts()
    for m in module.modules():
        _count_module(m, c, int(max_kernel_size))
    c.nodes += _input_width(traced)
    flattens, adds = _op_counts(traced)
    if flattens:
        c.nodes += flattens * c.widest_in
        c.edges += flattens * c.widest_in
        c.layer_edges += [c.widest_in] * flattens
    if adds:
        c.nodes += adds * c.widest
        c.edges += adds * 2 * c.widest
        c.layer_edges += [2 * c.widest] * adds
    f = itemsize(dtype)
    k = int(max_kernel_size)
    extra = sum(b.numel() * b.element_size() for b in module.buffers())
    graph = _graph_bytes(c.nodes, c.edges, c.rows, k, f, extra)
    return GraphMemoryEstimate(
        module_type=type(module).__name__,
        num_nodes=c.nodes,
        num_edges=c.edges,
        edge_dim=k,
        max_kernel=c.max_kernel,
        dtype=dtype,
        graph_bytes=graph,
        peak_bytes=_peak_bytes(graph, c.edges, c.layer_edges, k, f),
    )

