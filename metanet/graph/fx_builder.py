"""The interpreter behind :func:`metanet.graph.from_module`.

``_Tracer`` replays a recorded (or fx-traced) module on concrete inputs and, next to every
tensor, tracks which parameter-graph nodes stand for its neurons (``_NV``: node ids laid over
one or more tensor axes, see :mod:`metanet.graph.axes`); each supported op adds nodes / edges /
parameter slots to a ``_Builder``. The constructions are described in
:mod:`metanet.graph.tracing`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from metanet.graph.axes import (
    AxisError,
    index_neurons,
    moved_last,
    permute_neurons,
    reshape_neurons,
    unique_rows,
)
from metanet.graph.paramgraph import (
    EDGE_TYPE_DTYPE,
    NODE_BIAS,
    NODE_FEATURES,
    NODE_RUNNING_MEAN,
    NODE_RUNNING_VAR,
    EdgeType,
    NodeType,
    ParamSlot,
)
from metanet.limits import ENV_VAR, MemoryLimitError, format_bytes
from metanet.limits import itemsize as _itemsize


class UnsupportedOpError(ValueError):
    """A module, function or method that :func:`from_module` cannot map to a parameter graph
    (the message names the op and the module path)."""


# ----------------------------------------------------------------------------- value kinds
@dataclass
class _NV:
    """A tensor whose axes ``axes`` (ascending) hold the neurons ``nodes`` (graph node ids,
    ``nodes.shape[i] == tensor.shape[axes[i]]``); ``axis`` is the first neuron axis."""

    nodes: Tensor
    axis: int
    depth: int
    exclusive: bool  # its neurons are used by nothing else (so a residual add may merge)
    axes: tuple[int, ...] = ()
    bias_free: bool = False  # fresh SCALE neurons whose bias column is still free

    def __post_init__(self) -> None:
        if not self.axes:
            self.axes = (self.axis,)
        self.axes = tuple(int(a) for a in self.axes)
        self.axis = self.axes[0]

    @property
    def flat(self) -> Tensor:
        return self.nodes.reshape(-1)

    def shared(self) -> _NV:
        """The same neurons, marked as used elsewhere (no residual may merge into them)."""
        return _NV(self.nodes, 0, self.depth, False, self.axes)


@dataclass
class _Opaque:
    """A tensor without neuron structure: a constant, the input token ids, or a parameter
    (``param_key``) seen through view-like ops (``index``: flat indices into the parameter,
    shaped like the value)."""

    what: str
    param_key: str | None = None
    index: Tensor | None = None
    is_input: bool = False


@dataclass
class _Stat:
    """A per-position statistic of neurons (mean, variance, RMS): multiplying / dividing
    neurons by it is a parameter-free normalization that keeps them."""

    what: str


@dataclass
class _Scores:
    """Attention logits / weights of the heads ``heads`` (graph node ids)."""

    heads: Tensor
    depth: int
    query: _NV  # the queries (their neuron axes shape grouped-query attention's outputs)


@dataclass
class _Tuple:
    items: list


_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.SELU,
    nn.CELU, nn.Softplus, nn.Mish, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softsign,
    nn.Tanhshrink, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout,
    nn.LogSigmoid, nn.PReLU,
)  # fmt: skip
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
# ops (by name: function, method or operator) that act on each neuron separately
_ELEMENTWISE = {
    "relu", "sigmoid", "tanh", "sin", "cos", "gelu", "silu", "leaky_relu", "elu", "selu", "celu",
    "softplus", "mish", "hardtanh", "hardswish", "hardsigmoid", "relu6", "dropout", "dropout1d",
    "dropout2d", "alpha_dropout", "feature_alpha_dropout", "softsign", "tanhshrink",
    "logsigmoid", "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to",
    "type_as", "type", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "erf", "square", "pow",
    "clamp", "clip", "reciprocal", "sign", "requires_grad",
}  # fmt: skip
_POOL = {
    "max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_max_pool1d", "adaptive_max_pool2d",
}  # fmt: skip
_VIEWS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze"}
_EXPANDS = {"expand", "expand_as", "broadcast_to"}
_PERMUTES = {"transpose", "swapaxes", "permute", "movedim", "t", "getattr"}
_SPLITS = {"split", "chunk", "unbind", "tensor_split", "split_with_sizes"}
_REDUCE = {"mean", "sum", "amax", "amin", "var", "std", "norm", "logsumexp"}
_BINARY = {"add", "sub", "mul", "div"}
_ALIASES = {
    "iadd": "add", "isub": "sub", "imul": "mul", "truediv": "div", "itruediv": "div",
    "true_divide": "div", "multiply": "mul", "subtract": "sub", "concat": "cat",
    "concatenate": "cat", "bmm": "matmul",
}  # fmt: skip
# view-like ops replayed on a parameter's index tensor (the value stays that parameter)
_PARAM_VIEWS = _VIEWS | _EXPANDS | _PERMUTES | {
    "getitem", "contiguous", "clone", "to", "float", "double", "half", "type_as", "detach",
}  # fmt: skip
_CASTS = {"to", "float", "double", "half", "type_as", "detach", "contiguous", "clone"}
_LAST_AXIS_MODULES = (nn.Linear, nn.LayerNorm, nn.MultiheadAttention)
_CHANNEL_AXIS_MODULES = (nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm,
                         nn.Flatten) + _POOL_MODULES  # fmt: skip
_RMSNorm = getattr(nn, "RMSNorm", None)


def is_hf_conv1d(m: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a Linear whose weight is stored ``[in, out]``."""
    weight = getattr(m, "weight", None)
    return (
        type(m).__name__ == "Conv1D"
        and type(m).__module__.startswith("transformers")
        and isinstance(weight, Tensor)
        and weight.dim() == 2
    )


def is_leaf(m: nn.Module) -> bool:
    """Modules recorded as one op: the supported layers (unless a subclass re-implements
    ``forward``; BatchNorm / GroupNorm subclasses are read as their base class, e.g. a custom
    GroupNorm that re-implements ``forward`` for vmap) and parameter-free ``torch.nn`` layers
    (activations, pooling, dropout, ``Flatten``, ``Softmax``; other childless ``torch.nn``
    layers such as ``LSTM`` too, so that the error names them)."""
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)):
        return True
    bases = [nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm, nn.Embedding, nn.MultiheadAttention]
    if _RMSNorm is not None:
        bases.append(_RMSNorm)
    for base in bases:
        if isinstance(m, base):
            return type(m).forward is base.forward
    if is_hf_conv1d(m):
        return True
    if type(m).__module__.startswith("torch.nn.modules"):
        return not any(True for _ in m.children())
    return False


# ----------------------------------------------------------------------------- symbolic trace
# shared by the tracer (input guessing) and the memory estimate, which runs before any build
class _LeafTracer(fx.Tracer):
    """fx tracer with the leaves of :func:`is_leaf` (only used to guess an input and for
    :func:`metanet.graph.memory.estimate_graph_memory` without an example input)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_leaf(m) or super().is_leaf_module(m, module_qualified_name)


def _trace(module: nn.Module) -> fx.GraphModule:
    """Symbolic fx trace (no example input); UnsupportedOpError if fx cannot trace it."""
    concrete: dict[str, Any] = {}
    params = list(inspect.signature(module.forward).parameters.values())
    for p in params[1:]:
        if p.default is not inspect.Parameter.empty:
            concrete[p.name] = p.default
    try:
        tracer = _LeafTracer()
        graph = tracer.trace(module, concrete_args=concrete or None)
        return fx.GraphModule(tracer.root, graph, type(module).__name__)
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, ...)
        raise UnsupportedOpError(
            f"torch.fx could not trace {type(module).__name__}: {type(exc).__name__}: {exc}"
        ) from exc


def input_consumers(gm: fx.GraphModule) -> Iterator[fx.Node]:
    """The nodes reached from the (first) input, breadth first, each once: the walk that finds
    the first layer and the input's neuron axis."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return
    frontier, seen = [placeholders[0]], set()
    while frontier:
        node = frontier.pop(0)
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            yield user
            frontier.append(user)


def _first_consumer(gm: fx.GraphModule) -> nn.Module | tuple[str, tuple[int, ...]] | None:
    """The first layer reached from the input through parameter-free ops: a module, or
    ``("linear" | "conv", weight_shape)`` for ``F.linear`` / ``F.conv*d`` on a parameter."""
    for user in input_consumers(gm):
        if user.op == "call_module":
            m = gm.get_submodule(str(user.target))
            if isinstance(m, _LAST_AXIS_MODULES + _CHANNEL_AXIS_MODULES) and not isinstance(
                m, nn.Flatten
            ):
                return m
        if user.op == "call_function" and user.target in (F.linear, F.conv1d, F.conv2d):
            w = user.args[1] if len(user.args) > 1 else user.kwargs.get("weight")
            if isinstance(w, fx.Node) and w.op == "get_attr":
                kind = "linear" if user.target is F.linear else "conv"
                return kind, tuple(gm.get_parameter(str(w.target)).shape)
    return None


def _op_key(n: fx.Node) -> str:
    """The op's name without in-place underscore (``add_`` -> ``add``, ``operator.iadd`` ->
    ``add``): functions, methods and operators of one name share a construction."""
    name = str(n.target) if n.op == "call_method" else getattr(n.target, "__name__", "")
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    return _ALIASES.get(name, name)


# ----------------------------------------------------------------------------- builder
class _Builder:
    """Accumulates nodes, edges and parameter slots (edges in creation order)."""

    def __init__(self, max_kernel_size: int, dtype: torch.dtype,
                 budget: tuple[int, str] | None = None) -> None:  # fmt: skip
        self.k = max_kernel_size
        self.dtype = dtype
        # (limit in bytes, what is built): add_nodes / add_edges raise MemoryLimitError before
        # allocating past it; a safety net behind metanet.graph.memory's estimate
        self.budget = budget
        self.bytes = 0
        self._node_bytes = len(NODE_FEATURES) * _itemsize(dtype) + 3 * 8
        # a value row, int32 endpoints and a uint8 type (the finished graph's layout)
        self._edge_bytes = max_kernel_size * _itemsize(dtype) + 2 * 4 + 1
        self.n = 0
        self.node_type: list[Tensor] = []
        self.node_layer: list[Tensor] = []
        self.node_pos: list[Tensor] = []
        self.x: list[Tensor] = []
        self.e = 0
        self.src: list[Tensor] = []
        self.dst: list[Tensor] = []
        self.etype: list[Tensor] = []
        self.eattr: list[Tensor] = []
        self.slots: dict[str, ParamSlot] = {}
        self.slot_owner: dict[str, str] = {}
        self.retyped: list[tuple[Tensor, NodeType]] = []  # applied by tracing._finalize

    def retype(self, ids: Tensor, ntype: NodeType) -> None:
        """Give existing nodes another type (e.g. a Linear's outputs become query neurons once
        an attention op reads them)."""
        self.retyped.append((ids.reshape(-1).clone(), ntype))

    def add_nodes(
        self, count: int, ntype: NodeType, layer: int, pos: Tensor | None = None
    ) -> Tensor:
        self._reserve(count * self._node_bytes, f"{count:,} nodes")
        ids = torch.arange(self.n, self.n + count)
        self.n += count
        self.node_type.append(torch.full((count,), int(ntype), dtype=torch.long))
        self.node_layer.append(torch.full((count,), int(layer), dtype=torch.long))
        self.node_pos.append(
            torch.full((count,), -1, dtype=torch.long) if pos is None else pos.long().clone()
        )
        self.x.append(torch.zeros(count, len(NODE_FEATURES), dtype=self.dtype))
        return ids

    def _reserve(self, nbytes: int, what: str) -> None:
        self.bytes += nbytes
        if self.budget is not None and self.bytes > self.budget[0]:
            limit, built = self.budget
            raise _tagged(MemoryLimitError(
                f"{built}: adding {what} takes the graph to {format_bytes(self.bytes)}, over "
                f"metanet's memory limit of {format_bytes(limit)} (set {ENV_VAR} to change it)"
            ))  # fmt: skip

    def set_node_values(self, ids: Tensor, col: int, values: Tensor) -> None:
        """Nodes created by one ``add_nodes`` call are contiguous; write their column."""
        start = int(ids[0])
        off = 0
        for chunk in self.x:
            if off <= start < off + chunk.size(0):
                chunk[start - off : start - off + ids.numel(), col] = values.detach().to(
                    device="cpu", dtype=self.dtype
                )
                return
            off += chunk.size(0)
        raise AssertionError("node ids not found")  # pragma: no cover

    def add_edges(
        self, src: Tensor, dst: Tensor, etype: EdgeType, values: Tensor | None = None
    ) -> Tensor:
        count = src.numel()
        self._reserve(count * self._edge_bytes, f"{count:,} edges")
        ids = torch.arange(self.e, self.e + count, dtype=torch.int32)
        self.e += count
        if self.e + count >= (1 << 31) or self.n >= (1 << 31):
            raise _tagged(MemoryLimitError(
                f"{self.budget[1] if self.budget else 'the parameter graph'}: more than 2**31 "
                "edges or nodes; split the network"
            ))  # fmt: skip
        self.src.append(src.to(device="cpu", dtype=torch.int32))
        self.dst.append(dst.to(device="cpu", dtype=torch.int32))
        self.etype.append(torch.full((count,), int(etype), dtype=EDGE_TYPE_DTYPE))
        attr = torch.zeros(count, self.k, dtype=self.dtype)
        if values is None:
            attr[:, 0] = 1.0
        else:
            values = values.detach().reshape(count, -1)
            attr[:, : values.size(1)] = values.to(device="cpu", dtype=self.dtype)
        self.eattr.append(attr)
        return ids

    def add_slot(self, key: str, param: Tensor, source: str, rows: Tensor, col: int, width: int,
                 where: str) -> None:  # fmt: skip
        if key in self.slots:
            raise UnsupportedOpError(
                f"parameter '{key}' is used twice (at '{self.slot_owner[key]}' and '{where}'): "
                "weight sharing is not supported"
            )
        self.slots[key] = ParamSlot(
            key=key, shape=tuple(param.shape), dtype=param.dtype, source=source,
            rows=rows.long().cpu(), col=col, width=width,
        )  # fmt: skip
        self.slot_owner[key] = where



# ----------------------------------------------------------------------------- tracer
def _tagged(exc: Exception) -> Exception:
    """Remember the message: fx.Interpreter appends its own context to escaping errors."""
    exc.metanet_message = str(exc)  # type: ignore[attr-defined]
    return exc


def _module_path(n: fx.Node) -> str:
    if n.op == "call_module":
        return str(n.meta.get("metanet_path", n.target)) or "<root>"
    stack = n.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return str(path) or "<root>"
    return "<root>"


def _op_name(n: fx.Node, module: nn.Module | None = None) -> str:
    if n.op == "call_module":
        return f"module {type(module).__name__}"
    if n.op == "call_method":
        return f"method Tensor.{n.target}"
    t = n.target
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)
    mod = getattr(t, "__module__", None)
    return f"function {mod + '.' if mod else ''}{name}"


def _free(nv: _NV, src: Any) -> bool:
    """Whether ``nv`` (the value of fx node ``src``, or a value made inside this op when
    ``src`` is not a node) may carry a residual sum: its neurons are used by nothing else."""
    return nv.exclusive and (not isinstance(src, fx.Node) or len(src.users) == 1)


class _Tracer(fx.Interpreter):
    """Runs the traced graph on concrete inputs and builds the parameter graph alongside."""

    def __init__(self, gm: fx.GraphModule, builder: _Builder, input_axis: int) -> None:
        super().__init__(gm)
        self.b = builder
        self.input_axis = input_axis
        self.info: dict[fx.Node, Any] = {}
        self.params = dict(gm.named_parameters(remove_duplicate=False))
        self.output_nodes: Tensor | None = None
        self.called: set[str] = set()
        self.slices: list[tuple[fx.Node, Tensor]] = []  # (getitem, neurons it leaves out)

    # -- helpers
    def _err(self, n: fx.Node, why: str, module: nn.Module | None = None) -> UnsupportedOpError:
        return _tagged(UnsupportedOpError(
            f"unsupported {_op_name(n, module)} at module path '{_module_path(n)}' "
            f"(fx node '{n.name}'): {why}"
        ))  # fmt: skip

    def _nv_args(self, n: fx.Node) -> tuple[tuple, dict]:
        def look(a: fx.Node) -> Any:
            return self.info.get(a)

        return fx.node.map_arg(n.args, look), fx.node.map_arg(n.kwargs, look)

    @staticmethod
    def _flat(obj: Any) -> list:
        out: list = []
        if isinstance(obj, (list, tuple)):
            for o in obj:
                out += _Tracer._flat(o)
        elif isinstance(obj, dict):
            for o in obj.values():
                out += _Tracer._flat(o)
        elif isinstance(obj, slice):
            out += [obj.start, obj.stop, obj.step]
        else:
            out.append(obj)
        return out

    def _pass(self, n: fx.Node, src: Any, nv: _NV, result: Any,
              axes: int | tuple[int, ...] | None = None,
              nodes: Tensor | None = None) -> _NV:  # fmt: skip
        """Same neurons as ``nv`` (the value of fx node ``src``), maybe on other axes."""
        axes = nv.axes if axes is None else (axes,) if isinstance(axes, int) else axes
        out = _NV(nv.nodes if nodes is None else nodes, 0, nv.depth, _free(nv, src), axes=axes)
        self._check_axis(n, out, result)
        return out

    def _check_axis(self, n: fx.Node, nv: _NV, result: Any) -> None:
        if not isinstance(result, Tensor):
            raise self._err(n, "expected a tensor result")
        ok = nv.nodes.dim() == len(nv.axes) and all(
            a < result.dim() and result.shape[a] == nv.nodes.shape[i]
            for i, a in enumerate(nv.axes)
        )
        if not ok:
            raise self._err(
                n,
                f"result shape {tuple(result.shape)} does not keep the neurons "
                f"{tuple(nv.nodes.shape)} on axes {nv.axes}",
            )

    def _require_axis(self, n: fx.Node, nv: _NV, x: Tensor, axis: int, what: str,
                      module: nn.Module | None = None) -> None:  # fmt: skip
        if nv.axes != (axis,):
            raise self._err(
                n,
                f"{what} acts on axis {axis} of a {tuple(x.shape)} tensor whose neurons lie on "
                f"axes {nv.axes}",
                module,
            )

    def _aligned(self, nv: _NV, x: Any, result: Tensor) -> _NV:
        """``nv`` (value ``x``) with its axes counted in ``result``'s broadcast dims."""
        shift = result.dim() - x.dim() if isinstance(x, Tensor) else 0
        if not shift:
            return nv
        return _NV(nv.nodes, 0, nv.depth, nv.exclusive, tuple(a + shift for a in nv.axes))

    def _concrete(self, n: fx.Node) -> tuple:
        args, _ = self.fetch_args_kwargs_from_env(n)
        return args

    def _param(self, v: Any) -> Tensor:
        return self.params[v.param_key]

    # -- fx.Interpreter hook
    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.info[n] = self._handle(n, result)
        return result

    def _handle(self, n: fx.Node, result: Any) -> Any:
        if n.op == "placeholder":
            return self._placeholder(n, result)
        if n.op == "get_attr":
            key = str(n.target)
            if not isinstance(result, Tensor):
                return None
            if key in self.params:
                index = torch.arange(result.numel()).view(result.shape)
                return _Opaque(f"parameter '{key}'", key, index)
            return _Opaque(f"attribute '{key}'")
        if n.op == "output":
            return self._output(n)
        args, kwargs = self._nv_args(n)
        if n.op == "call_module":
            module = self.module.get_submodule(str(n.target))
            return self._call_module(n, module, args, kwargs, result)
        handled = self._call_op(n, _op_key(n), args, kwargs, result)
        if handled is not NotImplemented:
            return handled
        return self._fallback(n, args, kwargs, result)

    def _fallback(self, n: fx.Node, args: tuple, kwargs: dict, result: Any) -> Any:
        """Ops without a construction: fine on constants, attention scores and statistics
        (they stay what they are), an error on neuron values and on parameters."""
        flat = self._flat((args, kwargs))
        if any(isinstance(a, (_NV, _Tuple)) for a in flat):
            raise self._err(n, "no parameter-graph construction for this op on neuron values")
        params = [a for a in flat if isinstance(a, _Opaque) and a.param_key]
        if params:
            if _op_key(n) in _PARAM_VIEWS and len(params) == 1:
                return self._param_view(n, params[0], result)
            raise self._err(
                n, f"{params[0].what} is consumed by an op without a parameter-graph construction"
            )
        if not isinstance(result, Tensor):
            return None
        scores = [a for a in flat if isinstance(a, _Scores)]
        if scores:
            return scores[0]
        if any(isinstance(a, _Stat) for a in flat):
            return _Stat(f"result of {n.name}")
        return _Opaque(f"result of {n.name}", is_input=any(
            isinstance(a, _Opaque) and a.is_input for a in flat
        ))  # fmt: skip

    def _param_view(self, n: fx.Node, p: _Opaque, result: Any) -> _Opaque:
        """A view-like op on a parameter: replay it on the parameter's index tensor."""
        if _op_key(n) in _CASTS:
            return _Opaque(p.what, p.param_key, p.index)

        def sub(a: fx.Node) -> Any:
            info = self.info.get(a)
            if isinstance(info, _Opaque) and info.param_key:
                return info.index
            return self.env[a]

        args = fx.node.map_arg(n.args, sub)
        kwargs = fx.node.map_arg(n.kwargs, sub)
        if n.op == "call_method":
            index = getattr(args[0], str(n.target))(*args[1:], **kwargs)
        else:
            index = n.target(*args, **kwargs)
        if not isinstance(index, Tensor) or tuple(index.shape) != tuple(result.shape):
            raise self._err(n, f"cannot follow {p.what} through this op")
        return _Opaque(p.what, p.param_key, index)

    def _placeholder(self, n: fx.Node, result: Any) -> Any:
        if not isinstance(result, Tensor):
            return None
        if any(isinstance(v, _NV) for v in self.info.values()):
            raise self._err(n, "only modules with a single tensor input are supported")
        if not (torch.is_floating_point(result) or torch.is_complex(result)):
            return _Opaque("the input ids", is_input=True)
        axis = self.input_axis if result.dim() > 1 else 0
        count = int(result.shape[axis])
        ids = self.b.add_nodes(count, NodeType.INPUT, 0, pos=torch.arange(count))
        return _NV(ids, axis, 0, exclusive=False)

    def _output(self, n: fx.Node) -> None:
        """The module's outputs: every returned tensor computed from the input (a tuple, list or
        dict of them, e.g. a main and an auxiliary head); their neurons become ``OUTPUT`` nodes
        numbered in return order. Returned attention weights and constants are not outputs."""
        args, _ = self._nv_args(n)
        outs = [a for a in self._flat(args) if isinstance(a, _NV)]
        if not outs:
            raise self._err(n, "the module returns no tensor computed from its input")
        flat = torch.cat([o.flat for o in outs])
        order = torch.unique(flat, return_inverse=True)[1]
        first = torch.full((int(order.max()) + 1,), flat.numel(), dtype=torch.long)
        first.scatter_reduce_(0, order, torch.arange(flat.numel()), "amin")
        self.output_nodes = flat[first.sort().values]  # each neuron once, in return order
        self._check_slices()
        return None

    def _check_slices(self) -> None:
        """A slice of the neuron axis is fine when the neurons it leaves out are used
        elsewhere (split heads, rotary halves); dropping neurons altogether is not encoded."""
        if not self.slices:
            return
        used = torch.cat([c for c in self.b.src] + [self.output_nodes])
        for n, dropped in self.slices:
            if not bool(torch.isin(dropped, used).all()):
                raise self._err(n, "the slice drops neurons that nothing else uses")

    # -- parametric constructions
    def _dense(self, n: fx.Node, nv: _NV, out_count: int, weight: Tensor, w_key: str,
               bias: Tensor | None, b_key: str | None, etype: EdgeType, groups: int = 1,
               slot_param: Tensor | None = None, transposed: bool = False) -> _NV:  # fmt: skip
        """Linear or conv: new neurons, one edge per (out, in) pair of a group carrying
        ``w[out, in]`` (``groups`` > 1: output ``o`` reads only its group's inputs).
        ``slot_param`` is the stored tensor when ``weight`` is a view of it (``transposed``:
        stored ``[in, out]``, Hugging Face's Conv1D)."""
        where = _module_path(n)
        in_count = nv.flat.numel()
        width = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
        if width > self.b.k:
            raise _tagged(
                ValueError(
                    f"conv '{where}' has a kernel of shape {tuple(weight.shape[2:])} ({width} "
                    f"elements), more than max_kernel_size={self.b.k}; "
                    "pass a larger max_kernel_size"
                )
            )
        if in_count % groups or out_count % groups:
            raise self._err(n, f"{in_count} inputs / {out_count} outputs in {groups} groups")
        per_in, per_out = in_count // groups, out_count // groups
        if weight.shape[1] != per_in:
            raise self._err(n, f"weight {tuple(weight.shape)} does not read {per_in} inputs")
        out = self.b.add_nodes(out_count, NodeType.HIDDEN, nv.depth + 1)
        dst = out.to(torch.int32).repeat_interleave(per_in)  # int32 like the graph's endpoints
        src = nv.flat.to(torch.int32).view(groups, per_in).repeat_interleave(per_out, dim=0)
        src = src.reshape(-1)
        eids = self.b.add_edges(src, dst, etype, weight.reshape(out_count * per_in, width))
        rows = eids.view(out_count, per_in).t().reshape(-1) if transposed else eids
        stored = weight if slot_param is None else slot_param
        self.b.add_slot(w_key, stored, "edge", rows, 0, width, where)
        if bias is not None and b_key is not None:
            self.b.set_node_values(out, NODE_BIAS, bias)
            self.b.add_slot(b_key, bias, "node", out, NODE_BIAS, 1, where)
        return _NV(out, nv.axis, nv.depth + 1, exclusive=True)

    def _patch_dense(self, n: fx.Node, nv: _NV, weight: Tensor, w_key: str,
                     bias: Tensor | None, b_key: str | None, groups: int = 1) -> _NV:  # fmt: skip
        """A conv whose kernel is wider than ``max_kernel_size``, read as the linear map it is
        over each window (im2col): every input channel gets one ``PATCH`` node per kernel
        offset (``node_pos``; a unit ``PATCH`` edge from its channel), and each output channel
        one scalar edge per weight element from those offsets (within its group). Exact for any
        stride, padding or dilation (ResNet's 7x7 stem, ConvNeXt's 7x7 depthwise convs, ViT's
        patch embedding), and the kernel never widens the edges of the other layers."""
        out_ch, per_group_in = int(weight.shape[0]), int(weight.shape[1])
        p = math.prod(weight.shape[2:])
        in_ch = nv.flat.numel()
        pos = torch.arange(p).repeat(in_ch)
        pix = self.b.add_nodes(in_ch * p, NodeType.PATCH, nv.depth, pos=pos)
        self.b.add_edges(nv.flat.repeat_interleave(p), pix, EdgeType.PATCH)
        pix_nv = _NV(pix, nv.axis, nv.depth, exclusive=True)
        return self._dense(n, pix_nv, out_ch, weight.reshape(out_ch, per_group_in * p), w_key,
                           bias, b_key, EdgeType.CONV, groups=groups,
                           slot_param=weight)  # fmt: skip

    def _norm(self, n: fx.Node, module: nn.Module, nv: _NV, prefix: str) -> _NV:
        stats = {}
        for name, col in (("running_mean", NODE_RUNNING_MEAN), ("running_var", NODE_RUNNING_VAR)):
            stat = getattr(module, name, None)
            if isinstance(stat, Tensor):
                stats[col] = (stat, prefix + name)
        groups = module.num_groups if isinstance(module, nn.GroupNorm) else 1
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        return self._norm_values(n, nv, weight, prefix + "weight", bias, prefix + "bias", stats,
                                 groups)  # fmt: skip

    def _norm_values(self, n: fx.Node, nv: _NV, weight: Tensor | None, w_key: str,
                     bias: Tensor | None, b_key: str, stats: dict | None = None,
                     groups: int = 1) -> _NV:  # fmt: skip
        """``NORM`` neurons: edge ``c -> c'`` carries the scale, ``x[:, 0]`` the shift,
        ``x[:, 1:3]`` running statistics; ``1 < groups < C`` adds ``GROUP`` nodes."""
        where = _module_path(n)
        c = nv.flat.numel()
        out = self.b.add_nodes(c, NodeType.NORM, nv.depth + 1)
        eids = self.b.add_edges(nv.flat, out, EdgeType.NORM, weight)
        if weight is not None:
            self.b.add_slot(w_key, weight, "edge", eids, 0, 1, where)
        if bias is not None:
            self.b.set_node_values(out, NODE_BIAS, bias)
            self.b.add_slot(b_key, bias, "node", out, NODE_BIAS, 1, where)
        for col, (stat, key) in (stats or {}).items():
            self.b.set_node_values(out, col, stat)
            self.b.add_slot(key, stat, "node", out, col, 1, where)
        if 1 < groups < c:
            g_nodes = self.b.add_nodes(groups, NodeType.GROUP, nv.depth + 1)
            self.b.add_edges(g_nodes.repeat_interleave(c // groups), out, EdgeType.GROUP)
        return _NV(out.view(nv.nodes.shape), 0, nv.depth + 1, exclusive=True, axes=nv.axes)

    def _embedding(self, n: fx.Node, idx: Any, weight: Tensor, key: str, result: Tensor) -> _NV:
        """Embedding table ``[V, D]``: ``V`` one-hot nodes (``INPUT`` when indexed by the module
        input, ``POSITION`` otherwise; ``node_pos`` = row), ``D`` neurons, one ``EMBEDDING``
        edge per table entry."""
        if isinstance(idx, (_NV, _Tuple, _Scores, _Stat)):
            raise self._err(n, "embedding indices computed from neuron values")
        v, d = int(weight.shape[0]), int(weight.shape[1])
        is_input = isinstance(idx, _Opaque) and idx.is_input
        ntype = NodeType.INPUT if is_input else NodeType.POSITION
        one_hot = self.b.add_nodes(v, ntype, 0, pos=torch.arange(v))
        out = self.b.add_nodes(d, NodeType.HIDDEN, 1)
        eids = self.b.add_edges(one_hot.repeat_interleave(d), out.repeat(v), EdgeType.EMBEDDING,
                                weight.reshape(-1, 1))  # fmt: skip
        self.b.add_slot(key, weight, "edge", eids, 0, 1, _module_path(n))
        return _NV(out, result.dim() - 1, 1, exclusive=True)

    def _param_rows(self, n: fx.Node, p: _Opaque, nv: _NV, result: Tensor) -> Tensor:
        """The distinct per-neuron index rows ``[M, C]`` of parameter ``p`` broadcast against
        ``nv`` in ``result`` (M = 1 for a per-neuron vector; each element exactly once)."""
        try:
            idx = torch.broadcast_to(p.index, result.shape)
        except RuntimeError as exc:
            raise self._err(n, f"{p.what} does not broadcast to {tuple(result.shape)}") from exc
        rows = unique_rows(moved_last(idx, nv.axes))
        numel = self._param(p).numel()
        if rows.numel() != numel or not torch.equal(rows.flatten().sort().values,
                                                   torch.arange(numel)):  # fmt: skip
            raise self._err(n, f"{p.what} is not laid out along the neurons {tuple(nv.axes)}")
        return rows

    def _scale(self, n: fx.Node, src: Any, nv: _NV, p: _Opaque, result: Tensor) -> _NV:
        """``x * gamma`` (layer scale, RMSNorm weight): ``SCALE`` neurons, edge ``c -> c'``
        carrying ``gamma[c]``."""
        rows = self._param_rows(n, p, nv, result)
        if rows.size(0) != 1:
            raise self._err(n, f"{p.what} varies along non-neuron axes (not a per-neuron scale)")
        per = rows[0]
        weight = self._param(p)
        out = self.b.add_nodes(per.numel(), NodeType.SCALE, nv.depth + 1)
        eids = self.b.add_edges(nv.flat, out, EdgeType.SCALE, weight.reshape(-1)[per])
        slot_rows = torch.empty_like(eids)
        slot_rows[per] = eids
        self.b.add_slot(p.param_key, weight, "edge", slot_rows, 0, 1, _module_path(n))
        res = _NV(out.view(nv.nodes.shape), 0, nv.depth + 1, True, nv.axes, bias_free=True)
        self._check_axis(n, res, result)
        return res

    def _shift(self, n: fx.Node, src: Any, nv: _NV, p: _Opaque, result: Tensor) -> _NV:
        """``x + beta``: a per-neuron shift is the bias of fresh ``SCALE`` neurons (those of a
        preceding ``x * gamma`` when free, else new ones with unit ``SCALE`` edges); a shift
        that varies along other axes (a learned position embedding) is an embedding table
        added as a residual."""
        rows = self._param_rows(n, p, nv, result)
        weight = self._param(p)
        where = _module_path(n)
        if rows.size(0) > 1:
            emb = self._table(n, p.param_key, weight, rows, nv)
            return self._add(n, nv, emb, 1.0, result, _free(nv, src), True)
        per = rows[0]
        if nv.bias_free and _free(nv, src):
            out = nv.flat
            res = _NV(nv.nodes, 0, nv.depth, True, nv.axes)
        else:
            out = self.b.add_nodes(per.numel(), NodeType.SCALE, nv.depth + 1)
            self.b.add_edges(nv.flat, out, EdgeType.SCALE)
            res = _NV(out.view(nv.nodes.shape), 0, nv.depth + 1, True, nv.axes)
        self.b.set_node_values(out, NODE_BIAS, weight.reshape(-1)[per])
        slot_rows = torch.empty_like(out)
        slot_rows[per] = out
        self.b.add_slot(p.param_key, weight, "node", slot_rows, NODE_BIAS, 1, where)
        self._check_axis(n, res, result)
        return res

    def _table(self, n: fx.Node, key: str, weight: Tensor, rows: Tensor, like: _NV) -> _NV:
        """A parameter used as ``M`` learned rows of neuron values (position embedding, cls
        token): ``M`` ``POSITION`` nodes, ``C`` neurons, edge ``m -> c`` carrying its entry."""
        m, c = rows.shape
        pos = self.b.add_nodes(m, NodeType.POSITION, 0, pos=torch.arange(m))
        out = self.b.add_nodes(c, NodeType.HIDDEN, 1)
        flat = rows.flatten()
        eids = self.b.add_edges(pos.repeat_interleave(c), out.repeat(m), EdgeType.EMBEDDING,
                                weight.reshape(-1)[flat])  # fmt: skip
        slot_rows = torch.empty_like(eids)
        slot_rows[flat] = eids
        self.b.add_slot(key, weight, "edge", slot_rows, 0, 1, _module_path(n))
        return _NV(out.view(like.nodes.shape), 0, 1, True, like.axes)

    def _attention(self, n: fx.Node, m: nn.MultiheadAttention, args: tuple, kwargs: dict,
                   concrete: tuple) -> _Tuple:  # fmt: skip
        names = ["query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                 "average_attn_weights", "is_causal"]  # fmt: skip
        bound = dict(zip(names, args))
        bound.update(kwargs)
        for extra in ("key_padding_mask", "attn_mask"):
            if isinstance(bound.get(extra), (_NV, _Tuple)):
                raise self._err(n, f"{extra} computed from neuron values", m)
        if m.bias_k is not None or m.bias_v is not None:
            raise self._err(n, "add_bias_kv=True is not supported", m)
        qkv = []
        for i, name in enumerate(("query", "key", "value")):
            nv = bound.get(name)
            if not isinstance(nv, _NV):
                raise self._err(n, f"{name} is not computed from the module input", m)
            self._require_axis(n, nv, concrete[i], concrete[i].dim() - 1, "attention", m)
            qkv.append(nv)
        where = _module_path(n)
        e, h = m.embed_dim, m.num_heads
        d = e // h
        depth = max(v.depth for v in qkv) + 1
        head_of = torch.arange(e) // d
        heads = self.b.add_nodes(h, NodeType.ATTN_HEAD, depth)
        ntypes = (NodeType.ATTN_QUERY, NodeType.ATTN_KEY, NodeType.ATTN_VALUE)
        etypes = (EdgeType.ATTN_QUERY, EdgeType.ATTN_KEY, EdgeType.ATTN_VALUE)
        if m._qkv_same_embed_dim:
            weights = list(m.in_proj_weight.chunk(3))
        else:
            weights = [m.q_proj_weight, m.k_proj_weight, m.v_proj_weight]
        biases = list(m.in_proj_bias.chunk(3)) if m.in_proj_bias is not None else [None] * 3
        proj_nodes, proj_edges = [], []
        for nv, w, bias, nt, et in zip(qkv, weights, biases, ntypes, etypes):
            ids = self.b.add_nodes(e, nt, depth)
            in_count = nv.nodes.numel()
            eids = self.b.add_edges(
                nv.nodes.repeat(e), ids.repeat_interleave(in_count), et, w.reshape(-1, 1)
            )
            if bias is not None:
                self.b.set_node_values(ids, NODE_BIAS, bias)
            proj_nodes.append(ids)
            proj_edges.append(eids)
        q, k, v = proj_nodes
        if m._qkv_same_embed_dim:
            self.b.add_slot(where + ".in_proj_weight", m.in_proj_weight, "edge",
                            torch.cat(proj_edges), 0, 1, where)  # fmt: skip
        else:
            for name, w, eids in zip(("q", "k", "v"), weights, proj_edges):
                self.b.add_slot(f"{where}.{name}_proj_weight", w, "edge", eids, 0, 1, where)
        if m.in_proj_bias is not None:
            self.b.add_slot(where + ".in_proj_bias", m.in_proj_bias, "node",
                            torch.cat(proj_nodes), NODE_BIAS, 1, where)  # fmt: skip
        self.b.add_edges(k, q, EdgeType.ATTN_PAIR)
        self.b.add_edges(torch.cat([q, k]), heads[head_of].repeat(2), EdgeType.ATTN_HEAD)
        self.b.add_edges(heads[head_of], v, EdgeType.ATTN_HEAD)
        out_nv = _NV(v, qkv[0].axis, depth, exclusive=False)
        res = self._dense(n, out_nv, e, m.out_proj.weight, where + ".out_proj.weight",
                          m.out_proj.bias, where + ".out_proj.bias", EdgeType.ATTN_OUT)  # fmt: skip
        return _Tuple([res, _Opaque("attention weights")])

    # -- attention written as tensor ops (Hugging Face, timm): heads from the neuron axes
    def _heads_2d(self, n: fx.Node, nv: _NV, dim: int, feature_axis: int, what: str) -> Tensor:
        """``[H, d]`` node ids of a query / key / value laid out ``[..., H, ..., d]`` (one head
        when it has a single neuron axis)."""
        if nv.axes == (feature_axis,):
            return nv.nodes.reshape(1, -1)
        if len(nv.axes) == 2 and nv.axes[1] == feature_axis:
            return nv.nodes
        raise self._err(n, f"{what} neurons on axes {nv.axes} of a {dim}-d tensor are not "
                           "[heads, head_dim]")  # fmt: skip

    def _scores(self, n: fx.Node, q: Tensor, k: Tensor, depth: int, query: _NV) -> _Scores:
        """Heads of ``q`` / ``k`` (``[H, d]`` node ids): ``H`` head nodes with ``ATTN_HEAD``
        edges from their query and key neurons, ``ATTN_PAIR`` edges key_j -> query_j. With
        grouped-query attention (``H`` a multiple of the key heads, e.g. Llama's
        ``num_key_value_heads``) each key head serves its group of query heads."""
        if q.shape[1] != k.shape[1] or q.shape[0] % k.shape[0]:
            raise self._err(
                n, f"queries {tuple(q.shape)} and keys {tuple(k.shape)} [heads, head_dim] do not "
                "pair up (query heads must be a multiple of key heads, with one head_dim)"
            )
        k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
        h, d = q.shape
        heads = self.b.add_nodes(h, NodeType.ATTN_HEAD, depth)
        self.b.add_edges(k.reshape(-1), q.reshape(-1), EdgeType.ATTN_PAIR)
        head_of = heads.repeat_interleave(d)
        self.b.add_edges(torch.cat([q.reshape(-1), k.reshape(-1)]), head_of.repeat(2),
                         EdgeType.ATTN_HEAD)  # fmt: skip
        self.b.retype(q, NodeType.ATTN_QUERY)
        self.b.retype(k, NodeType.ATTN_KEY)
        return _Scores(heads, depth, query)

    def _apply_scores(self, n: fx.Node, s: _Scores, v: _NV, v2: Tensor, result: Tensor) -> _NV:
        """Heads -> their value neurons (``ATTN_HEAD``). The attended values are the value
        neurons themselves (a head mixes tokens, not neurons), unless value heads are shared by
        several query heads (grouped-query attention): then every query head gets its own
        ``ATTN_VALUE`` copy of its group's value neurons (``ATTN_PAIR`` edge value -> copy),
        which is what the output projection reads."""
        h = s.heads.numel()
        if h % v2.shape[0]:
            raise self._err(n, f"{h} heads attend over values {tuple(v2.shape)}")
        v2 = v2.repeat_interleave(h // v2.shape[0], dim=0)
        self.b.retype(v2, NodeType.ATTN_VALUE)
        depth = max(v.depth, s.depth)
        head_of = s.heads.repeat_interleave(v2.shape[1])
        if v2.reshape(-1).unique().numel() == v2.numel():
            self.b.add_edges(head_of, v2.reshape(-1), EdgeType.ATTN_HEAD)
            out = _NV(v.nodes, 0, depth, False, v.axes)
        else:
            copies = self.b.add_nodes(v2.numel(), NodeType.ATTN_VALUE, depth)
            self.b.add_edges(v2.reshape(-1), copies, EdgeType.ATTN_PAIR)
            self.b.add_edges(head_of, copies, EdgeType.ATTN_HEAD)
            like = v if v.nodes.numel() == copies.numel() else s.query
            out = _NV(copies.view(like.nodes.shape), 0, depth, True, like.axes)
        self._check_axis(n, out, result)
        return out

    def _score_bias(self, n: fx.Node, s: _Scores, p: _Opaque, result: Tensor) -> _Scores:
        """A parameter added to the attention logits (Swin's relative position bias table,
        T5 / ALiBi-style learned biases): each entry biases the logits of one head at a fixed
        set of (query, key) positions. Entries with the same set of positions share one
        ``POSITION`` node (``node_pos`` = its rank), with one ``EMBEDDING`` edge per entry into
        the head it biases, so permuting heads (with the table's head column) is a graph
        automorphism."""
        weight = self._param(p)
        idx = p.index.reshape((1,) * (result.dim() - p.index.dim()) + tuple(p.index.shape))
        h = s.heads.numel()
        axis = s.query.axes[0] if h > 1 and len(s.query.axes) == 2 else None
        if axis is None:
            per_head = idx.reshape(1, -1)
        elif idx.shape[axis] == h:
            per_head = idx.movedim(axis, 0).reshape(h, -1)
        else:
            raise self._err(n, f"{p.what} biases the logits of {h} heads with one value "
                               f"(shape {tuple(p.index.shape)}); only per-head biases have a "
                               "graph construction")  # fmt: skip
        numel = weight.numel()
        owner = torch.full((numel,), -1, dtype=torch.long)
        pattern: dict[int, tuple[int, ...]] = {}
        for head in range(per_head.size(0)):
            order = torch.argsort(per_head[head], stable=True)
            ids, counts = torch.unique_consecutive(per_head[head][order], return_counts=True)
            if bool((owner[ids] >= 0).any()):
                raise self._err(n, f"an entry of {p.what} biases several heads")
            owner[ids] = head
            for e, positions in zip(ids.tolist(), order.split(counts.tolist())):
                pattern[e] = tuple(positions.tolist())
        if bool((owner < 0).any()):
            raise self._err(n, f"{int((owner < 0).sum())} entries of {p.what} bias no logit")
        keys = sorted(set(pattern.values()))
        rank = {k: i for i, k in enumerate(keys)}
        pos = self.b.add_nodes(len(keys), NodeType.POSITION, 0, pos=torch.arange(len(keys)))
        src = pos[torch.tensor([rank[pattern[e]] for e in range(numel)], dtype=torch.long)]
        eids = self.b.add_edges(src, s.heads[owner], EdgeType.EMBEDDING, weight.reshape(-1, 1))
        self.b.add_slot(p.param_key, weight, "edge", eids, 0, 1, _module_path(n))
        return s

    def _sdpa(self, n: fx.Node, args: tuple, kwargs: dict, result: Tensor) -> _NV:
        names = ["query", "key", "value", "attn_mask"]
        bound = dict(zip(names, args))
        bound.update(kwargs)
        cs = self._concrete(n)
        if isinstance(bound.get("attn_mask"), (_NV, _Tuple)):
            raise self._err(n, "attn_mask computed from neuron values")
        qkv = []
        for i, name in enumerate(names[:3]):
            nv = bound.get(name)
            if not isinstance(nv, _NV):
                raise self._err(n, f"{name} is not computed from the module input")
            x = cs[i] if i < len(cs) else kwargs.get(name)
            qkv.append((nv, x))
        (q, xq), (k, xk), (v, xv) = qkv
        q2 = self._heads_2d(n, q, xq.dim(), xq.dim() - 1, "query")
        k2 = self._heads_2d(n, k, xk.dim(), xk.dim() - 1, "key")
        v2 = self._heads_2d(n, v, xv.dim(), xv.dim() - 1, "value")
        s = self._scores(n, q2, k2, max(q.depth, k.depth), q)
        return self._apply_scores(n, s, v, v2, result)

    def _matmul(self, n: fx.Node, a: Any, b: Any, result: Tensor) -> Any:
        """``q @ k^T`` of two neuron values gives attention scores, ``scores @ v`` the attended
        values, ``x @ W`` a Linear with a stored ``[in, out]`` parameter."""
        ca, cb = self._concrete(n)[:2]
        if isinstance(a, _NV) and isinstance(b, _NV):
            q2 = self._heads_2d(n, a, ca.dim(), ca.dim() - 1, "query")
            kt = self._heads_2d(n, b, cb.dim(), cb.dim() - 2, "key")
            return self._scores(n, q2, kt, max(a.depth, b.depth), a)
        if isinstance(a, _Scores) and isinstance(b, _NV):
            v2 = self._heads_2d(n, b, cb.dim(), cb.dim() - 1, "value")
            return self._apply_scores(n, a, self._aligned(b, cb, result), v2, result)
        if isinstance(a, _NV) and isinstance(b, _Opaque) and b.param_key:
            w = self._param(b)
            if w.dim() != 2 or not torch.equal(b.index, torch.arange(w.numel()).view(w.shape)):
                raise self._err(n, f"{b.param_key} is used through a view in a matmul")
            self._require_axis(n, a, ca, ca.dim() - 1, "matmul")
            return self._dense(n, a, int(w.shape[1]), w.t(), b.param_key, None, None,
                               EdgeType.LINEAR, slot_param=w, transposed=True)  # fmt: skip
        if isinstance(a, (_NV, _Scores)) or isinstance(b, (_NV, _Scores)):
            raise self._err(n, "matmul is supported as q @ k^T, scores @ v and x @ W")
        return NotImplemented

    # -- structural constructions
    def _add(self, n: fx.Node, a: Any, b: Any, alpha: float, result: Any,
             a_free: bool | None = None, b_free: bool | None = None) -> _NV:  # fmt: skip
        if not (isinstance(a, _NV) and isinstance(b, _NV)):
            raise self._err(n, "only the sum of two neuron values (a residual) is supported")
        if a.nodes.shape != b.nodes.shape or a.axes != b.axes:
            raise self._err(n, "the residual operands have different neuron sets / axes")
        overlap = bool(torch.isin(a.flat, b.flat).any())
        a_ok = (_free(a, n.args[0]) if a_free is None else a_free) and not overlap
        b_ok = (_free(b, n.args[1]) if b_free is None else b_free) and not overlap
        b_ok = b_ok and alpha == 1.0  # alpha scales b: b cannot carry the sum
        count = a.flat.numel()
        if b_ok and (not a_ok or int(b.flat.max()) > int(a.flat.max())):
            # merge into b: a's neurons feed b's with weight 1, b keeps its own
            self.b.add_edges(a.flat, b.flat, EdgeType.RESIDUAL, torch.ones(count))
            out = _NV(b.nodes, 0, max(a.depth, b.depth), True, b.axes)
        elif a_ok:
            self.b.add_edges(b.flat, a.flat, EdgeType.RESIDUAL, torch.full((count,), float(alpha)))
            out = _NV(a.nodes, 0, max(a.depth, b.depth), True, a.axes)
        else:
            depth = max(a.depth, b.depth)
            s = self.b.add_nodes(count, NodeType.SUM, depth)
            self.b.add_edges(a.flat, s, EdgeType.RESIDUAL, torch.ones(count))
            self.b.add_edges(b.flat, s, EdgeType.RESIDUAL, torch.full((count,), float(alpha)))
            out = _NV(s.view(a.nodes.shape), 0, depth, True, a.axes)
        self._check_axis(n, out, result)
        return out

    def _product(self, n: fx.Node, a: _NV, b: _NV, result: Tensor) -> _NV:
        """Elementwise product of two neuron sets (gated MLP, squeeze-excitation gate):
        ``PRODUCT`` neurons with unit edges from both operands."""
        if a.nodes.shape != b.nodes.shape or a.axes != b.axes:
            raise self._err(n, "the product operands have different neuron sets / axes")
        p = self.b.add_nodes(a.flat.numel(), NodeType.PRODUCT, max(a.depth, b.depth))
        self.b.add_edges(torch.cat([a.flat, b.flat]), p.repeat(2), EdgeType.PRODUCT)
        out = _NV(p.view(a.nodes.shape), 0, max(a.depth, b.depth), True, a.axes)
        self._check_axis(n, out, result)
        return out

    def _binary(self, n: fx.Node, name: str, args: tuple, kwargs: dict, result: Any) -> Any:
        if len(args) < 2 or not isinstance(result, Tensor):
            return NotImplemented
        a, b = args[0], args[1]
        if name == "add" and float(kwargs.get("alpha", 1.0)) == 1.0:
            for sc, p in ((a, b), (b, a)):
                if isinstance(sc, _Scores) and isinstance(p, _Opaque) and p.param_key:
                    return self._score_bias(n, sc, p, result)
        if not (isinstance(a, _NV) or isinstance(b, _NV)):
            return NotImplemented
        cs = self._concrete(n)
        if isinstance(a, _NV):
            a = self._aligned(a, cs[0], result)
        if isinstance(b, _NV):
            b = self._aligned(b, cs[1], result)
        alpha = float(kwargs.get("alpha", 1.0))
        if isinstance(a, _NV) and isinstance(b, _NV):
            if a.axes == b.axes and torch.equal(a.nodes, b.nodes):  # f(x) (op) g(x)
                return self._pass(n, None, a, result, nodes=a.nodes).shared()
            if name in ("add", "sub"):
                return self._add(n, a, b, -alpha if name == "sub" else alpha, result)
            if name == "mul":
                return self._product(n, a, b, result)
            raise self._err(n, f"{name} of two different neuron sets")
        nv, other, src = (a, b, n.args[0]) if isinstance(a, _NV) else (b, a, n.args[1])
        if isinstance(other, (_Scores, _Tuple)):
            raise self._err(n, "neuron values combined with attention scores")
        if isinstance(other, _Opaque) and other.param_key:
            if name == "mul":
                return self._scale(n, src, nv, other, result)
            if name == "add" and alpha == 1.0:
                return self._shift(n, src, nv, other, result)
            raise self._err(n, f"{other.what} in '{name}' has no graph construction")
        return self._pass(n, src, nv, result)  # a number, a constant or a statistic

    def _cat(self, n: fx.Node, args: tuple, kwargs: dict, result: Tensor) -> Any:
        items = args[0] if args else kwargs.get("tensors")
        if not isinstance(items, (list, tuple)) or not any(isinstance(i, _NV) for i in items):
            return NotImplemented
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        dim = int(dim) % result.dim()
        cs = self._concrete(n)[0]
        nvs = [(i, it) for i, it in enumerate(items) if isinstance(it, _NV)]
        ref = nvs[0][1]
        if dim in ref.axes:  # concatenation of neuron sets
            if len(nvs) != len(items) or any(it.axes != ref.axes for _, it in nvs):
                raise self._err(n, "concatenation along the neuron axis of non-neuron values")
            k = ref.axes.index(dim)
            nodes = torch.cat([it.nodes for _, it in nvs], dim=k)
            excl = all(_free(it, n.args[0][i]) for i, it in nvs)
            out = _NV(nodes, 0, max(it.depth for _, it in nvs), excl, ref.axes)
            self._check_axis(n, out, result)
            return out
        acc: _NV | None = None  # along another axis (tokens): every part feeds the same neurons
        acc_free = True
        for i, it in enumerate(items):
            part, free = it, True
            if isinstance(it, _Opaque) and it.param_key:
                rows = unique_rows(moved_last(it.index, ref.axes))
                part = self._table(n, it.param_key, self._param(it), rows, ref)
            elif isinstance(it, _NV):
                free = _free(it, n.args[0][i])
            elif isinstance(it, (_Scores, _Tuple)):
                raise self._err(n, "concatenation with attention scores")
            else:
                continue
            if acc is None:
                acc, acc_free = part, free
            elif not torch.equal(acc.nodes, part.nodes):
                acc = self._add(n, acc, part, 1.0, result, acc_free, free)
                acc_free = True
        assert acc is not None
        self._check_axis(n, acc, result)
        return acc if len(cs) else acc

    def _split(self, n: fx.Node, nv: _NV, x: Tensor, name: str, args: tuple, kwargs: dict,
               result: Any) -> _Tuple:  # fmt: skip
        if not isinstance(result, (tuple, list)):
            raise self._err(n, "expected a tuple of tensors")
        if name == "unbind":
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        else:
            dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
        dim = int(dim) % x.dim()
        parts, start = [], 0
        for r in result:
            if dim not in nv.axes:
                parts.append(self._pass(n, n.args[0], nv, r).shared())
                continue
            k = nv.axes.index(dim)
            if name == "unbind":
                axes, nodes = index_neurons((slice(None),) * dim + (start,), x.dim(), nv.axes,
                                            nv.nodes)  # fmt: skip
                start += 1
            else:
                size = r.shape[dim]
                axes, nodes = nv.axes, nv.nodes.narrow(k, start, size)
                start += size
            parts.append(_NV(nodes, 0, nv.depth, nv.exclusive, axes))
        return _Tuple(parts)

    def _view(self, n: fx.Node, src: Any, nv: _NV, x: Tensor, result: Tensor) -> _NV:
        """reshape / view / flatten / (un)squeeze: move the neuron axes (split into heads or
        groups, merge back), or the flatten construction of a conv's channels."""
        s_in, s_out = tuple(x.shape), tuple(result.shape)
        if s_in == s_out:
            return self._pass(n, src, nv, result)
        copies = tuple(a for a in range(x.dim()) if x.shape[a] > 1 and x.stride(a) == 0)
        try:
            moved = reshape_neurons(s_in, s_out, nv.axes, nv.nodes, copies)
        except AxisError as exc:
            raise self._err(n, str(exc)) from None
        if moved is not None:
            return self._pass(n, src, nv, result, moved[0], moved[1])
        return self._flatten(n, nv, x, result)

    def _flatten(self, n: fx.Node, nv: _NV, x: Tensor, result: Tensor) -> _NV:
        """Flatten of ``[.., C, *S]`` into ``[.., C * prod(S)]``: ``FLATTEN`` nodes, one per
        (channel, position), fed by their channel."""
        a = nv.axis
        s_in, s_out = tuple(x.shape), tuple(result.shape)
        spatial = math.prod(s_in[a + 1 :])
        if s_out[:a] != s_in[:a] or len(s_out) != a + 1 or s_out[a] != s_in[a] * spatial:
            raise self._err(n, f"reshape {s_in} -> {s_out} is not a flatten of axis {a} onwards")
        c = nv.nodes.numel()
        pos = torch.arange(spatial).repeat(c)
        flat = self.b.add_nodes(c * spatial, NodeType.FLATTEN, nv.depth, pos=pos)
        self.b.add_edges(nv.nodes.repeat_interleave(spatial), flat, EdgeType.FLATTEN)
        out = _NV(flat, a, nv.depth, exclusive=True)
        self._check_axis(n, out, result)
        return out

    def _permute(self, n: fx.Node, name: str, nv: _NV, x: Tensor, args: tuple, kwargs: dict,
                 result: Tensor) -> _NV:  # fmt: skip
        nd = x.dim()
        dims = list(range(nd))
        if name in ("transpose", "swapaxes"):
            d0, d1 = (int(d) % nd for d in args[1:3])
            dims[d0], dims[d1] = dims[d1], dims[d0]
        elif name == "t" or (name == "getattr" and args[1] in ("T", "mT")):
            if name == "getattr" and args[1] == "T":
                dims = dims[::-1]
            else:
                dims[-1], dims[-2] = dims[-2], dims[-1]
        elif name == "permute":
            spec = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
            dims = [int(d) % nd for d in (spec or kwargs.get("dims"))]
        elif name == "movedim":
            src = [args[1]] if isinstance(args[1], int) else list(args[1])
            dst = [args[2]] if isinstance(args[2], int) else list(args[2])
            src, dst = [s % nd for s in src], [d % nd for d in dst]
            rest = [d for d in range(nd) if d not in src]
            dims = [-1] * nd
            for s, d in zip(src, dst):
                dims[d] = s
            it = iter(rest)
            dims = [d if d >= 0 else next(it) for d in dims]
        else:
            return NotImplemented
        axes, nodes = permute_neurons(dims, nv.axes, nv.nodes)
        return self._pass(n, n.args[0], nv, result, axes, nodes)

    def _reduce(self, n: fx.Node, nv: _NV, x: Tensor, args: tuple, kwargs: dict, name: str,
                result: Any) -> Any:  # fmt: skip
        if not isinstance(result, Tensor):
            raise self._err(n, "expected a tensor result")
        pos = 2 if name == "norm" else 1
        dims = kwargs.get("dim", args[pos] if len(args) > pos else None)
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            raise self._err(n, "reduction over all axes mixes neurons")
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = sorted(int(d) % x.dim() for d in dims)
        keepdim = result.dim() == x.dim()
        if any(a in dims for a in nv.axes):
            if keepdim:  # a per-position statistic (normalization)
                return _Stat(f"{name} over the neurons")
            raise self._err(n, f"reduction over the neuron axis {nv.axes}")
        axes = nv.axes if keepdim else tuple(a - sum(d < a for d in dims) for a in nv.axes)
        return self._pass(n, n.args[0], nv, result, axes)

    def _expand(self, n: fx.Node, nv: _NV, x: Tensor, result: Tensor) -> _NV:
        shift = result.dim() - x.dim()
        axes = tuple(a + shift for a in nv.axes)
        if any(result.shape[a + shift] != x.shape[a] for a in nv.axes):
            raise self._err(n, "expand along a neuron axis")
        return self._pass(n, n.args[0], nv, result, axes)

    # -- dispatch
    def _call_module(self, n: fx.Node, m: nn.Module, args: tuple, kwargs: dict, result: Any) -> Any:
        path = str(n.meta.get("metanet_path", n.target))
        if path in self.called and any(True for _ in m.parameters(recurse=False)):
            raise self._err(n, "module called twice (weight sharing is not supported)", m)
        self.called.add(path)
        concrete = self._concrete(n)
        prefix = path + "." if path else ""
        nv = args[0] if args else kwargs.get("input")
        if isinstance(m, nn.Embedding):
            return self._embedding(n, nv, m.weight, prefix + "weight", result)
        if isinstance(m, (nn.Softmax, nn.LogSoftmax)) and isinstance(nv, _Scores):
            return nv
        if not isinstance(m, nn.MultiheadAttention) and not isinstance(nv, _NV):
            if any(isinstance(a, _NV) for a in self._flat((args, kwargs))) or any(
                True for _ in m.parameters()
            ):
                raise self._err(n, "its first argument is not computed from the module input", m)
            return self._fallback(n, args, kwargs, result)
        if isinstance(m, nn.Linear) or is_hf_conv1d(m):
            x = concrete[0]
            self._require_axis(n, nv, x, x.dim() - 1, type(m).__name__, m)
            if isinstance(m, nn.Linear):
                return self._dense(n, nv, m.out_features, m.weight, prefix + "weight", m.bias,
                                   prefix + "bias", EdgeType.LINEAR)  # fmt: skip
            return self._dense(n, nv, int(m.weight.shape[1]), m.weight.t(), prefix + "weight",
                               m.bias, prefix + "bias", EdgeType.LINEAR, slot_param=m.weight,
                               transposed=True)  # fmt: skip
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            x = concrete[0]
            kdim = 1 if isinstance(m, nn.Conv1d) else 2
            self._require_axis(n, nv, x, x.dim() - kdim - 1, type(m).__name__, m)
            if math.prod(m.kernel_size) > self.b.k:
                return self._patch_dense(n, nv, m.weight, prefix + "weight", m.bias,
                                         prefix + "bias", groups=m.groups)  # fmt: skip
            return self._dense(n, nv, m.out_channels, m.weight, prefix + "weight", m.bias,
                               prefix + "bias", EdgeType.CONV, groups=m.groups)  # fmt: skip
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)):
            x = concrete[0]
            self._require_axis(n, nv, x, 1 if x.dim() > 1 else 0, type(m).__name__, m)
            return self._norm(n, m, nv, prefix)
        if isinstance(m, nn.LayerNorm) or (_RMSNorm is not None and isinstance(m, _RMSNorm)):
            x = concrete[0]
            if len(m.normalized_shape) != 1:
                raise self._err(n, f"normalized_shape {m.normalized_shape} spans several axes", m)
            self._require_axis(n, nv, x, x.dim() - 1, type(m).__name__, m)
            return self._norm(n, m, nv, prefix)
        if isinstance(m, nn.MultiheadAttention):
            return self._attention(n, m, args, kwargs, concrete)
        if any(True for _ in m.parameters(recurse=False)):
            raise self._err(n, "module with parameters that has no graph construction", m)
        if isinstance(m, _ELEMENTWISE_MODULES):
            return self._pass(n, n.args[0], nv, result)
        if isinstance(m, _POOL_MODULES):
            x = concrete[0]
            if x.dim() < 3 or nv.axes != (x.dim() - (1 if "1d" in type(m).__name__ else 2) - 1,):
                raise self._err(n, f"pooling needs the neurons on the channel axis of {x.shape}", m)
            return self._pass(n, n.args[0], nv, result)
        if isinstance(m, nn.Flatten):
            return self._view(n, n.args[0], nv, concrete[0], result)
        if isinstance(m, (nn.Softmax, nn.LogSoftmax)) and m.dim is not None:
            if int(m.dim) % concrete[0].dim() not in nv.axes:
                return self._pass(n, n.args[0], nv, result)
        raise self._err(n, "no parameter-graph construction for this module", m)

    def _call_op(self, n: fx.Node, name: str, args: tuple, kwargs: dict, result: Any) -> Any:
        """Functions, methods and operators, by name (see ``_op_key``)."""
        nv = args[0] if args else None
        if name == "getitem" and isinstance(nv, _Tuple):
            return nv.items[args[1]]
        if name in _BINARY:
            return self._binary(n, name, args, kwargs, result)
        if name == "cat":
            return self._cat(n, args, kwargs, result)
        if name == "matmul" and len(args) >= 2:
            return self._matmul(n, args[0], args[1], result)
        if name == "scaled_dot_product_attention":
            return self._sdpa(n, args, kwargs, result)
        if name == "embedding" and len(args) >= 2:
            w = args[1]
            if isinstance(w, _Opaque) and w.param_key:
                return self._embedding(n, args[0], self._param(w), w.param_key, result)
            return NotImplemented
        if name == "where" and len(args) == 3:
            branches = [a for a in args[1:] if isinstance(a, _NV)]
            if branches and not isinstance(args[0], (_NV, _Tuple)):
                cs = self._concrete(n)
                i = 1 if isinstance(args[1], _NV) else 2
                return self._pass(n, n.args[i], self._aligned(args[i], cs[i], result), result)
            return NotImplemented
        if not isinstance(nv, _NV):
            return NotImplemented
        x = self._concrete(n)[0]
        if name in _ELEMENTWISE:
            rest = self._flat((args[1:], kwargs))
            if any(isinstance(a, (_NV, _Tuple, _Scores)) or (isinstance(a, _Opaque) and a.param_key)
                   for a in rest):  # fmt: skip
                raise self._err(n, "elementwise op with a second tensor operand")
            return self._pass(n, n.args[0], nv, result)
        if name in _POOL:
            ks = 1 if name.endswith("1d") else 2
            if x.dim() < 3 or nv.axes != (x.dim() - ks - 1,):
                raise self._err(n, f"pooling needs the neurons on the channel axis of {x.shape}")
            return self._pass(n, n.args[0], nv, result)
        if name in ("softmax", "log_softmax"):
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if dim is None or int(dim) % x.dim() in nv.axes:
                raise self._err(n, "softmax over the neuron axis mixes neurons")
            return self._pass(n, n.args[0], nv, result)
        if name == "masked_fill" and not isinstance(args[1], (_NV, _Tuple)):
            return self._pass(n, n.args[0], nv, result)
        if name in _VIEWS:
            return self._view(n, n.args[0], nv, x, result)
        if name in _EXPANDS:
            return self._expand(n, nv, x, result)
        if name in _PERMUTES:
            return self._permute(n, name, nv, x, args, kwargs, result)
        if name == "getitem":
            try:
                axes, nodes = index_neurons(self._concrete(n)[1], x.dim(), nv.axes, nv.nodes)
            except AxisError as exc:
                raise self._err(n, str(exc)) from None
            if nodes.numel() < nv.nodes.numel():
                self.slices.append((n, nv.flat[~torch.isin(nv.flat, nodes.reshape(-1))]))
            return self._pass(n, n.args[0], nv, result, axes, nodes)
        if name in _SPLITS:
            return self._split(n, nv, x, name, args, kwargs, result)
        if name in _REDUCE:
            return self._reduce(n, nv, x, args, kwargs, name, result)
        if name in ("linear", "conv1d", "conv2d"):
            return self._functional_dense(n, name, args, kwargs)
        if name == "layer_norm" or name == "rms_norm":
            return self._functional_norm(n, name, nv, x, args, kwargs)
        return NotImplemented

    def _functional_dense(self, n: fx.Node, name: str, args: tuple, kwargs: dict) -> _NV:
        nv = args[0]
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        if not (isinstance(w, _Opaque) and w.param_key):
            raise self._err(n, "the weight is not a parameter of the module")
        if b is not None and not (isinstance(b, _Opaque) and b.param_key):
            raise self._err(n, "the bias is not a parameter of the module")
        weight = self._param(w)
        for p in (w, b):
            if p is not None and not torch.equal(p.index.flatten(), torch.arange(p.index.numel())):
                raise self._err(n, f"{p.what} is used through a view")
        bias = self._param(b) if b is not None else None
        x = self._concrete(n)[0]
        groups = 1
        if name == "linear":
            self._require_axis(n, nv, x, x.dim() - 1, "linear")
            etype = EdgeType.LINEAR
        else:
            groups = int(args[6] if len(args) > 6 else kwargs.get("groups", 1))
            self._require_axis(n, nv, x, x.dim() - (weight.dim() - 2) - 1, "conv")
            etype = EdgeType.CONV
        b_key = b.param_key if b is not None else None
        if etype == EdgeType.CONV and math.prod(weight.shape[2:]) > self.b.k:
            return self._patch_dense(n, nv, weight, w.param_key, bias, b_key, groups=groups)
        return self._dense(n, nv, weight.shape[0], weight, w.param_key, bias, b_key, etype,
                           groups=groups)  # fmt: skip

    def _functional_norm(self, n: fx.Node, name: str, nv: _NV, x: Tensor, args: tuple,
                         kwargs: dict) -> _NV:  # fmt: skip
        """``F.layer_norm`` / ``F.rms_norm`` over the last axis (e.g. a channels-first
        LayerNorm2d that permutes around it) with parameter scale / shift."""
        shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
        w = args[2] if len(args) > 2 else kwargs.get("weight")
        b = args[3] if len(args) > 3 and name == "layer_norm" else kwargs.get("bias")
        if len(tuple(shape)) != 1:
            raise self._err(n, f"normalized_shape {tuple(shape)} spans several axes")
        self._require_axis(n, nv, x, x.dim() - 1, name)
        for p in (w, b):
            if p is not None and not (isinstance(p, _Opaque) and p.param_key):
                raise self._err(n, "the scale / shift is not a parameter of the module")
        return self._norm_values(
            n, nv, self._param(w) if w is not None else None, w.param_key if w else "",
            self._param(b) if b is not None else None, b.param_key if b else "",
        )  # fmt: skip
