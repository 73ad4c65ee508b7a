"""Build a :class:`~metanet.graph.ParamGraph` from an ``nn.Module`` by tracing it with torch.fx.

The forward that actually runs on the example input (in ``eval()`` mode) is recorded as an fx
graph (:mod:`metanet.graph.recorder`: Python control flow, shape arithmetic, asserts and
Hugging Face attention dispatch just run), then that graph is *replayed* by a
``torch.fx.Interpreter`` that, next to the concrete tensors, tracks which graph nodes stand for
the neurons of every intermediate value (and along which tensor axes they lie: one axis, or
several after a split into heads / groups, :mod:`metanet.graph.axes`). Without an example the
input is guessed from a symbolic fx trace. Constructions (after Graph Metanetworks, Lim et al.
2024, and Neural Graphs, Kofinas et al. 2024):

* **Linear / Conv1d / Conv2d**: new neurons (``HIDDEN``) carrying the bias in ``x[:, 0]``; one
  edge per weight ``w[out, in]`` from input neuron to output neuron. A conv edge carries the
  kernel ``w[out, in].flatten()`` (row-major) zero-padded to ``max_kernel_size`` columns.
  **Grouped / depthwise** convs have edges only within a group (``out * in / groups`` edges).
  A conv whose kernel exceeds ``max_kernel_size`` (ResNet's 7x7 stem, ConvNeXt's 7x7
  depthwise convs, ViT's 16x16 patch embedding) is read as the linear map it is over each
  window (im2col): each input channel gets one ``PATCH`` node per kernel offset (unit ``PATCH``
  edges, ``node_pos`` = offset) and every weight element is one scalar edge from an offset
  node, so one wide kernel never widens the edges of every other layer. Hugging Face's ``Conv1D``
  (``[in, out]`` weights, GPT-2) is a Linear whose slot reads the transposed edges.
* **Embeddings** (``nn.Embedding``, ``F.embedding``): one one-hot node per row (``INPUT`` when
  indexed by the module's token-id input, ``POSITION`` for constant indices such as positions
  or token types; ``node_pos`` = row), ``D`` neurons, one ``EMBEDDING`` edge per entry. A
  parameter added along non-neuron axes (ViT's position embedding) or concatenated on the
  token axis (cls token) is the same construction, merged by a residual.
* **Tied weights** (one tensor under several names, GPT-2's ``lm_head`` / ``wte``): each use
  has its edges; ``layout.meta["tied"]`` maps the alias to the primary key and write-back
  returns one tensor for both.
* **Concatenation / split / slices along the neuron axis** concatenate / slice the node ids
  (DenseNet, ShuffleNet's chunk, fused QKV splits); a slice that drops neurons nothing else
  uses is an error. **Reshape / view / permute / transpose** move the neuron axes (heads,
  channel shuffle, channels-last, Swin windows) without new nodes; merging a neuron axis with
  other axes is only allowed as the flatten below.
* **Attention written as tensor ops** (``F.scaled_dot_product_attention`` or ``q @ k^T`` ...
  ``softmax`` ... ``@ v``, with separate or fused projections): queries / keys / values are
  the projection neurons laid out ``[heads, head_dim]`` (retyped ``ATTN_QUERY`` / ``KEY`` /
  ``VALUE``), plus ``ATTN_HEAD`` nodes and ``ATTN_PAIR`` edges as for MultiheadAttention below.
  Parameter-free rotary positions (``q * cos + rotate_half(q) * sin``) give ``SUM`` neurons
  fed by each neuron and its rotary partner. **Grouped-query attention** (Llama's
  ``num_key_value_heads``; ``enable_gqa`` or ``repeat_kv``'s expand + reshape): each key head
  pairs with every query head of its group, and each query head gets its own ``ATTN_VALUE``
  copy of its group's value neurons (``ATTN_PAIR`` edge value -> copy), read by the output
  projection. A **parameter added to the logits** (Swin's relative position bias table, learned
  per-head biases): entries that bias the same (query, key) positions share one ``POSITION``
  node, with one ``EMBEDDING`` edge per entry into the head it biases.
* **Per-neuron parameters**: ``x * gamma`` (layer scale, RMSNorm weight) adds ``SCALE``
  neurons with one ``SCALE`` edge per element; ``+ beta`` right after is their bias (else new
  ``SCALE`` neurons with unit edges). Parameter-free normalizations written as ops (RMSNorm's
  ``x * rsqrt(mean(x**2))``, manual LayerNorms) keep the neurons; ``F.layer_norm`` / RMSNorm
  modules are the normalization below.
* **Products of two neuron sets** (SwiGLU ``act(gate(x)) * up(x)``, squeeze-excitation
  ``x * gate``): ``PRODUCT`` neurons with unit edges from both operands.
* **Elementwise ops** (activations, dropout, identity, scalar ``*`` / ``/``) and **pooling**
  (max/avg/adaptive, ``mean``/``sum``/``amax`` over non-neuron axes) keep the same neurons:
  activations are not encoded as nodes.
* **Normalization** (BatchNorm1d/2d, LayerNorm / RMSNorm over the last axis, GroupNorm): ``NORM``
  neurons, one per channel; edge ``c -> c'`` carries the scale ``gamma`` (1.0 without affine),
  ``x[:, 0]`` the shift ``beta``, ``x[:, 1:3]`` BatchNorm's running mean / variance.
  ``num_batches_tracked`` (and any other buffer that is not a graph value) is kept in the
  layout's ``extras`` and restored verbatim. GroupNorm with ``1 < groups < channels`` adds one
  ``GROUP`` node per group with edges to its channels, so that only permutations inside a
  group (or of whole groups) are graph automorphisms.
* **Flatten after a conv** (our choice: *each channel connects to its spatial positions'
  neurons*): ``flatten`` of ``[B, C, *S]`` adds ``C * prod(S)`` ``FLATTEN`` neurons (node
  ``c * prod(S) + s`` has ``node_pos = s``) and a ``FLATTEN`` edge (value 1.0) from channel
  ``c`` to each of its positions; the following Linear has one scalar edge per weight. When
  ``prod(S) == 1`` (after global pooling) the channels are the flattened neurons: no new nodes.
  The spatial size comes from the example input.
* **Residual add** (``+``, ``torch.add(alpha=)``, ``-``): ``RESIDUAL`` identity edges (value
  ``alpha``, 1.0 for ``+``, -1.0 for ``-``) from one operand's neurons into the other's. If an
  operand's neurons are used by nothing but this add (e.g. the block output in
  ``x + block(x)``), the sum is merged into them (GMN's construction); otherwise new ``SUM``
  neurons get residual edges from both operands.
* **MultiheadAttention** (self- or cross-attention, ``embed_dim = H * d``): ``E`` query, ``E``
  key and ``E`` value neurons (biases from ``in_proj_bias``) with ``ATTN_QUERY`` /
  ``ATTN_KEY`` / ``ATTN_VALUE`` edges from the query / key / value inputs; ``H`` head nodes with
  ``ATTN_HEAD`` edges query_j -> head, key_j -> head, head -> value_j; an ``ATTN_PAIR`` edge
  key_j -> query_j (their dot product pairs them); ``E`` output neurons with ``ATTN_OUT`` edges
  from the value neurons (``out_proj``). Graph automorphisms are then exactly the attention
  symmetries: permuting heads, permuting query/key pairs inside a head, permuting value
  neurons inside a head. (GMN's reference shares one neuron set for q, k and v and does not
  encode heads; ours refines it.)

**Outputs**: every tensor the module returns that is computed from its input (a tensor, or a
tuple / list / dict of them, e.g. a main and an auxiliary head) gives ``OUTPUT`` nodes, numbered
in return order; a Hugging Face ``ModelOutput`` gives its first tensor (``logits``).

``node_pos`` pins the non-permutable neurons (input and output indices). Unsupported modules,
functions or methods raise :class:`UnsupportedOpError` naming the op and the module path.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from metanet.graph.fx_builder import (
    _CHANNEL_AXIS_MODULES,
    _LAST_AXIS_MODULES,
    UnsupportedOpError,
    _Builder,
    _first_consumer,
    _trace,
    _Tracer,
    input_consumers,
    is_leaf,
)
from metanet.graph.memory import GraphMemoryEstimate, estimate_graph_memory
from metanet.graph.paramgraph import (
    EDGE_TYPE_DTYPE,
    NODE_FEATURES,
    NodeType,
    ParamGraph,
    ParamLayout,
    ParamSlot,
    _ptr,
    check_finite,
    index_dtype,
)
from metanet.graph.recorder import record
from metanet.limits import MemoryLimitError, check_memory, format_bytes, memory_limit_bytes

__all__ = ["UnsupportedOpError", "from_module", "graphs_from_state_dicts"]


# ----------------------------------------------------------------------------- entry point
def _record(module: nn.Module, example: Tensor) -> fx.GraphModule:
    """The recorded forward of ``module`` on ``example`` (see :mod:`metanet.graph.recorder`)."""
    return record(module, example, is_leaf)


_CONV_FUNCTIONS = (F.conv1d, F.conv2d, torch.conv1d, torch.conv2d)


def _input_axis(gm: fx.GraphModule, example: Tensor) -> int:
    if example.dim() <= 2:
        return example.dim() - 1
    for user in input_consumers(gm):
        if user.op == "call_module":
            m = gm.get_submodule(str(user.target))
            if isinstance(m, _LAST_AXIS_MODULES):
                return example.dim() - 1
            if isinstance(m, _CHANNEL_AXIS_MODULES):
                return 1
        if user.op == "call_function" and user.target in (F.linear, F.layer_norm):
            return example.dim() - 1
        if user.op == "call_function" and user.target in _CONV_FUNCTIONS:
            return 1
    return 1


def _example_candidates(
    gm: fx.GraphModule, dtype: torch.dtype, device: torch.device
) -> list[Tensor]:
    m = _first_consumer(gm)
    shapes: list[tuple[int, ...]] = []
    sizes = (8, 16, 28, 32, 64, 4)
    if isinstance(m, tuple):
        kind, w = m
        if kind == "linear":
            shapes = [(2, w[1])]
        else:
            shapes = [(2, w[1]) + (s,) * (len(w) - 2) for s in sizes]
    elif isinstance(m, nn.Module):
        shapes = layer_input_shapes(m, sizes)
    return [torch.randn(s, dtype=dtype, device=device) for s in shapes]


def layer_input_shapes(m: nn.Module, sizes: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Input shapes (batch 2) that a network whose first layer is ``m`` may take, most likely
    first: flat and token-sequence inputs for Linear/LayerNorm, ``sizes`` as the spatial size of
    convolutions and 2-D norms; ``[]`` for other layers. Used to guess an example input."""
    if isinstance(m, nn.Linear):
        return [(2, m.in_features), (2, 3, m.in_features)]
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
        return [(2, m.normalized_shape[0]), (2, 3, m.normalized_shape[0])]
    if isinstance(m, nn.MultiheadAttention):
        return [(2, 3, m.embed_dim)]
    if isinstance(m, nn.Conv1d):
        return [(2, m.in_channels, s) for s in sizes]
    if isinstance(m, nn.Conv2d):
        return [(2, m.in_channels, s, s) for s in sizes]
    if isinstance(m, nn.BatchNorm1d):
        return [(2, m.num_features)]
    if isinstance(m, nn.BatchNorm2d):
        return [(2, m.num_features, s, s) for s in sizes]
    if isinstance(m, nn.GroupNorm):
        return [(2, m.num_channels)] + [(2, m.num_channels, s, s) for s in sizes]
    return []


def _check_graph_memory(module: nn.Module, est: GraphMemoryEstimate, gm: fx.GraphModule) -> None:
    """Refuse (:class:`MemoryLimitError`) a graph whose estimated peak exceeds the limit."""
    name = type(module).__name__
    try:
        check_memory(est.peak_bytes, f"building the parameter graph of {name} ({est.describe()})")
    except MemoryLimitError as err:
        hint = ""
        if est.max_kernel < est.edge_dim:
            smaller = estimate_graph_memory(module, est.max_kernel, est.dtype, traced=gm)
            hint = (
                f"; its largest kernel has {est.max_kernel} element(s): "
                f"max_kernel_size={est.max_kernel} would need {format_bytes(smaller.peak_bytes)}"
            )
        raise MemoryLimitError(f"{err}{hint}") from None


def _record_or_raise(module: nn.Module, example: Tensor) -> fx.GraphModule:
    """Record ``module(example)``; an error of the module's own forward is re-raised as is
    (RuntimeError for a shape mismatch), one of building the fx graph as UnsupportedOpError."""
    try:
        return _record(module, example)
    except (RuntimeError, TypeError, ValueError, AssertionError, IndexError):
        raise
    except Exception as exc:  # pragma: no cover - recorder bugs surface with the module named
        raise UnsupportedOpError(
            f"could not record {type(module).__name__}: {type(exc).__name__}: {exc}"
        ) from exc


def _guess_example(module: nn.Module, dtype: torch.dtype) -> tuple[Tensor, fx.GraphModule]:
    """An input guessed from the first layer of the symbolic fx trace (a Linear's
    ``in_features``; square images of a few sizes for a conv) and the recorded run on it."""
    try:
        sym = _trace(module)
    except UnsupportedOpError as exc:
        raise ValueError(
            f"cannot guess an input for {type(module).__name__} ({exc}); pass example_input"
        ) from None
    first = next(iter(module.parameters()), None)
    candidates = _example_candidates(
        sym,
        first.dtype if first is not None else dtype,
        first.device if first is not None else torch.device("cpu"),
    )
    if not candidates:
        raise ValueError(f"cannot guess an input for {type(module).__name__}; pass example_input")
    last_exc: Exception | None = None
    for cand in candidates:
        try:
            return cand, _record(module, cand)
        except RuntimeError as exc:  # a shape mismatch for this guess
            last_exc = exc
    raise ValueError(
        f"could not run {type(module).__name__} on guessed inputs "
        f"{[tuple(c.shape) for c in candidates]} ({last_exc}); pass example_input"
    )


def _build(gm: fx.GraphModule, example: Tensor, max_kernel_size: int, dtype: torch.dtype,
           budget: tuple[int, str] | None = None) -> tuple[_Builder, _Tracer]:  # fmt: skip
    builder = _Builder(max_kernel_size, dtype, budget)
    tracer = _Tracer(gm, builder, _input_axis(gm, example))
    try:
        with torch.no_grad():
            tracer.run(example)
    except MemoryLimitError as exc:  # drop fx.Interpreter's context lines
        raise MemoryLimitError(getattr(exc, "metanet_message", str(exc))) from None
    except ValueError as exc:
        message = getattr(exc, "metanet_message", None)
        if message is None:
            raise
        raise type(exc)(message) from None
    return builder, tracer


def from_module(
    module: nn.Module,
    example_input: Tensor | None = None,
    max_kernel_size: int = 9,
    allow_nonfinite: bool = False,
) -> ParamGraph:
    """The parameter graph of ``module`` (see :mod:`metanet.graph.tracing` for constructions).

    Args:
        module: the network; traced with torch.fx in ``eval()`` mode (its training flags are
            restored afterwards; it is run once, under ``no_grad``, on ``example_input``).
        example_input: one input batch (e.g. ``[B, C, H, W]``). Needed for the spatial size of a
            flatten after a conv; if ``None`` an input is guessed from the first layer (a
            Linear's ``in_features``; a conv gets square inputs of a few sizes until one runs).
        max_kernel_size: width ``K`` of ``edge_attr`` (number of kernel elements; 9 = 3x3).
        allow_nonfinite: if False (default), NaN/inf in any parameter or buffer raises.
    Returns:
        A :class:`ParamGraph` whose values are copies of the parameters.
    Raises:
        MemoryLimitError: the graph is estimated to need more than metanet's memory limit
            (:mod:`metanet.limits`; the message names the module class and the estimate); checked
            from the parameter shapes before anything graph-sized is allocated, and again as the
            graph grows.
        ValueError: non-finite values (naming the parameter); a conv kernel larger than
            ``max_kernel_size`` (naming the layer); no usable example input could be guessed.
        UnsupportedOpError: an op without a graph construction (naming the op and module path),
            weight sharing, or a parameter that the traced computation does not use.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"from_module expects an nn.Module, got {type(module).__name__}")
    if max_kernel_size < 1:
        raise ValueError(f"max_kernel_size must be >= 1, got {max_kernel_size}")
    state = module.state_dict()
    dtype = torch.get_default_dtype()
    for v in state.values():
        if torch.is_floating_point(v):
            dtype = torch.promote_types(dtype, v.dtype)
    flags = {name: sub.training for name, sub in module.named_modules()}
    try:
        module.eval()
        if example_input is not None:
            if not isinstance(example_input, Tensor):
                raise TypeError("example_input must be a single tensor")
            example = example_input
            gm = _record_or_raise(module, example)
        else:
            example, gm = _guess_example(module, dtype)
        est = estimate_graph_memory(module, max_kernel_size, dtype, traced=gm)
        _check_graph_memory(module, est, gm)  # before anything proportional to the weights
        check_finite(state, allow_nonfinite)
        # safety net for constructions the estimate misses: the builder stops past the limit
        budget = (memory_limit_bytes(), f"building the parameter graph of {type(module).__name__}")
        builder, tracer = _build(gm, example, max_kernel_size, dtype, budget)
    finally:
        for name, sub in module.named_modules():
            sub.training = flags[name]
    return _finalize(module, state, builder, tracer)


def _finalize(module: nn.Module, state: dict, b: _Builder, tracer: _Tracer) -> ParamGraph:
    params = dict(module.named_parameters(remove_duplicate=False))
    primary: dict[int, str] = {}
    tied: dict[str, str] = {}
    for key, p in params.items():  # one tensor under several names (tied embeddings)
        if id(p) in primary:
            tied[key] = primary[id(p)]
        else:
            primary[id(p)] = key
    for alias, first in list(tied.items()):  # the primary is a name the graph holds
        if first not in b.slots and alias in b.slots:
            group = [k for k, v in tied.items() if v == first] + [first]
            tied = {k: v for k, v in tied.items() if v != first}
            tied.update({k: alias for k in group if k != alias})
    extras: dict[str, Tensor] = OrderedDict()
    for key, value in state.items():
        if key in b.slots or (key in tied and tied[key] in b.slots):
            continue
        if key in params:
            raise UnsupportedOpError(
                f"parameter '{key}' is not used by any op the tracer maps to the graph "
                "(unused, tied to another parameter, or consumed by an unsupported op)"
            )
        extras[key] = value.detach().cpu().clone()
    if tracer.output_nodes is None:  # pragma: no cover - fx graphs always have an output
        raise UnsupportedOpError("the traced module has no output")
    node_type = torch.cat(b.node_type)
    for ids, ntype in b.retyped:
        node_type[ids] = int(ntype)
    node_pos = torch.cat(b.node_pos)
    out_nodes = tracer.output_nodes
    not_input = node_type[out_nodes] != int(NodeType.INPUT)
    node_type[out_nodes[not_input]] = int(NodeType.OUTPUT)
    node_pos[out_nodes[not_input]] = torch.arange(out_nodes.numel())[not_input]
    n = b.n
    # Chunks are consumed (and freed) as they are merged, so that building holds little more
    # than the finished graph (see metanet.graph.memory._peak_bytes).
    edge_index, order = _sorted_edges(b, n)
    slots = {}
    for key in list(b.slots):
        s = b.slots.pop(key)
        run = order.new_run(s.run_start, s.num_rows) if s.is_run else None
        if s.source == "node":  # node ids do not move
            slots[key] = s
        elif run is not None:
            slots[key] = ParamSlot.run(s.key, s.shape, s.dtype, s.source, run, s.num_rows,
                                       s.col, s.width)  # fmt: skip
        else:
            slots[key] = ParamSlot(s.key, s.shape, s.dtype, s.source, order.new_rows(s.rows),
                                   s.col, s.width)  # fmt: skip
    num_edges = order.num_edges
    edge_attr = _scatter_chunks(b.eattr, order, (num_edges, b.k), b.dtype)
    edge_type = _scatter_chunks(b.etype, order, (num_edges,), EDGE_TYPE_DTYPE)
    del order
    layout = ParamLayout(
        slots=slots, extras=extras, keys=list(state.keys()), num_nodes=n,
        num_edges=num_edges, node_dim=len(NODE_FEATURES), edge_dim=b.k,
        module_type=type(module).__name__, meta={"tied": tied} if tied else {},
    )  # fmt: skip
    return ParamGraph(
        x=torch.cat(b.x),
        edge_index=edge_index,
        edge_attr=edge_attr,
        edge_type=edge_type,
        node_type=node_type,
        node_layer=torch.cat(b.node_layer),
        node_pos=node_pos,
        dst_ptr=_ptr(edge_index[1], n),
        layout=layout,
    )


class _EdgeOrder:
    """Where every edge of the builder's chunks goes in the destination-sorted graph.

    Chunk ``i`` holds creation rows ``offsets[i]:offsets[i] + sizes[i]``; it lands either as one
    run of consecutive new rows starting at ``runs[i]`` (copied with a slice), or, when it was
    sorted together with chunks it overlaps, at the new rows ``tables[i]`` (int32/int64).
    """

    def __init__(self, offsets: list[int], sizes: list[int]) -> None:
        self.offsets, self.sizes = offsets, sizes
        self.runs: list[int | None] = [None] * len(sizes)
        self.tables: dict[int, Tensor] = {}
        self.num_edges = sum(sizes)

    def new_run(self, start: int, count: int) -> int | None:
        """The first sorted row of creation rows ``start:start + count`` when they land as one
        run (all in one chunk placed as a run), else ``None``."""
        i = bisect.bisect_right(self.offsets, start) - 1
        if count == 0 or i < 0 or self.runs[i] is None:
            return None
        if start + count > self.offsets[i] + self.sizes[i]:
            return None
        return self.runs[i] + start - self.offsets[i]

    def new_rows(self, rows: Tensor) -> Tensor:
        """The sorted graph's rows (int64) of the edges made at creation rows ``rows``."""
        rows = rows.reshape(-1).long()
        if rows.numel() == 0:
            return rows
        starts = torch.tensor(self.offsets, dtype=torch.long)
        chunk = torch.searchsorted(starts, rows, right=True) - 1
        out = torch.empty_like(rows)
        for i in torch.unique(chunk).tolist():
            sel = chunk == i
            local = rows[sel] - self.offsets[i]
            run = self.runs[i]
            out[sel] = local + run if run is not None else self.tables[i][local].long()
        return out


def _sorted_edges(b: _Builder, n: int) -> tuple[Tensor, _EdgeOrder]:
    """``edge_index`` sorted by ``(dst, src)`` (stable: ties keep creation order) and where each
    edge went; empties the builder's ``src`` / ``dst`` chunks.

    Most chunks (one Linear's or conv's edges) are already sorted and cover destinations no other
    chunk reaches, so chunks are ordered by their first key and only groups of chunks whose key
    ranges overlap (e.g. attention's pair edges into query neurons) are sorted: when nothing
    overlaps, building holds no graph-sized sort key, permutation or inverse, and every chunk
    is freed as soon as it is placed.
    """
    width = max(n, 1)
    chunks: list[tuple[Tensor, Tensor] | None] = list(zip(b.src, b.dst))
    b.src.clear()
    b.dst.clear()
    sizes = [int(c[1].numel()) for c in chunks]
    order = _EdgeOrder(_offsets_of(sizes), sizes)
    spans = []  # (first key, last key, chunk is sorted, chunk index)
    for i, (src, dst) in enumerate(chunks):
        if sizes[i]:
            spans.append((*_key_span(src, dst, width), i))
    spans.sort(key=lambda t: (t[0], t[3]))
    groups: list[list[tuple[int, int, bool, int]]] = []
    top = 0
    for span in spans:
        if groups and span[0] <= top:  # overlaps (or ties with) the group before: sort together
            groups[-1].append(span)
            top = max(top, span[1])
        else:
            groups.append([span])
            top = span[1]
    edge_index = torch.empty(2, order.num_edges, dtype=index_dtype(n))
    row = 0
    for group in groups:
        if len(group) == 1 and group[0][2]:
            i = group[0][3]
            src, dst = chunks[i]
            chunks[i] = None  # freed once placed
            edge_index[0, row : row + sizes[i]] = src
            edge_index[1, row : row + sizes[i]] = dst
            del src, dst
            order.runs[i] = row
            row += sizes[i]
            continue
        members = sorted(t[3] for t in group)  # creation order, so the stable sort keeps ties
        key = torch.cat([chunks[i][1].long() * width + chunks[i][0].long() for i in members])
        for i in members:
            chunks[i] = None
        sorted_key, perm = torch.sort(key, stable=True)
        del key
        count = int(sorted_key.numel())
        edge_index[0, row : row + count] = torch.remainder(sorted_key, width)
        edge_index[1, row : row + count] = torch.div(sorted_key, width, rounding_mode="floor")
        del sorted_key
        dtype = index_dtype(order.num_edges)
        placed = torch.empty(count, dtype=dtype)
        placed[perm] = torch.arange(row, row + count, dtype=dtype)
        del perm
        at = 0
        for i in members:
            order.tables[i] = placed[at : at + sizes[i]].clone()
            at += sizes[i]
        row += count
    for i, size in enumerate(sizes):
        if size == 0:
            order.runs[i] = row  # an empty chunk lands nowhere
    return edge_index, order


def _key_span(src: Tensor, dst: Tensor, width: int, piece: int = 1 << 20) -> tuple[int, int, bool]:
    """``(smallest key, largest key, sorted)`` of a chunk's ``dst * width + src`` keys, read in
    pieces so that no int64 copy of a large chunk is made."""
    lo, hi, ordered, last = None, None, True, None
    for s in range(0, dst.numel(), piece):
        key = dst[s : s + piece].long() * width + src[s : s + piece].long()
        first = int(key[0])
        ordered = ordered and (last is None or first >= last)
        ordered = ordered and (key.numel() < 2 or bool((key[1:] >= key[:-1]).all()))
        last = int(key[-1])
        k_lo, k_hi = int(key.min()), int(key.max())
        lo = k_lo if lo is None else min(lo, k_lo)
        hi = k_hi if hi is None else max(hi, k_hi)
    return int(lo), int(hi), ordered


def _offsets_of(sizes: list[int]) -> list[int]:
    out, total = [], 0
    for size in sizes:
        out.append(total)
        total += size
    return out


def _scatter_chunks(chunks: list[Tensor], order: _EdgeOrder, shape: tuple[int, ...],
                    dtype: torch.dtype) -> Tensor:  # fmt: skip
    """The chunks' rows moved to their sorted places (``order``), freeing each chunk as it is
    placed (empties ``chunks``)."""
    out = torch.empty(shape, dtype=dtype)
    i = 0
    while chunks:
        chunk = chunks.pop(0)
        run = order.runs[i]
        if run is not None:
            out[run : run + chunk.size(0)] = chunk
        else:
            out[order.tables[i].long()] = chunk
        i += 1
        del chunk
    return out


def graphs_from_state_dicts(template: ParamGraph, state_dicts: Sequence[dict],
                            allow_nonfinite: bool = False) -> list[ParamGraph]:  # fmt: skip
    """Graphs of many checkpoints of ``template``'s architecture (no re-tracing).

    Raises:
        MemoryLimitError: the graphs' own values (``x`` and ``edge_attr`` per checkpoint; the
            structure tensors are shared) would exceed metanet's memory limit.
    """
    per_graph = template.x.numel() * template.x.element_size()
    per_graph += template.edge_attr.numel() * template.edge_attr.element_size()
    layout = getattr(template, "layout", None)
    name = layout.module_type if isinstance(layout, ParamLayout) else "a module"
    check_memory(
        per_graph * len(state_dicts),
        f"the parameter graphs of {len(state_dicts)} checkpoints of {name} "
        f"({format_bytes(per_graph)} each)",
    )
    return [template.with_state_dict(sd, allow_nonfinite) for sd in state_dicts]
