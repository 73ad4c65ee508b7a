"""The torch.fx interpreter behind :func:`metanet.graph.from_module`.

``_Tracer`` runs a traced module on concrete inputs and, next to every tensor, tracks which
parameter-graph nodes stand for its neurons (``_NV``: node ids + tensor axis); each supported
op adds nodes / edges / parameter slots to a ``_Builder``. The constructions are described in
:mod:`metanet.graph.tracing`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from metanet.graph.paramgraph import (
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
    """A tensor whose ``axis`` holds the neurons ``nodes`` (graph node ids)."""

    nodes: Tensor
    axis: int
    depth: int
    exclusive: bool  # its neurons are used by nothing else (so a residual add may merge)


@dataclass
class _Opaque:
    """A tensor without neuron structure (a constant, a parameter, attention weights)."""

    what: str
    param_key: str | None = None


@dataclass
class _Tuple:
    items: list


_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.SELU,
    nn.CELU, nn.Softplus, nn.Mish, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softsign,
    nn.Tanhshrink, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout,
)  # fmt: skip
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, F.relu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, torch.sin, torch.cos,
    F.gelu, F.silu, F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.mish, F.hardtanh,
    F.hardswish, F.relu6, F.dropout, F.dropout1d, F.dropout2d, torch.nn.functional.softsign,
}  # fmt: skip
_POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
}  # fmt: skip
_ELEMENTWISE_METHODS = {
    "relu", "sigmoid", "tanh", "sin", "cos", "contiguous", "clone", "detach", "float", "double",
}  # fmt: skip
_META_METHODS = {"size", "dim", "numel"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul, operator.truediv, torch.div}
_REDUCE_FUNCTIONS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax"}
_LAST_AXIS_MODULES = (nn.Linear, nn.LayerNorm, nn.MultiheadAttention)
_CHANNEL_AXIS_MODULES = (nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm,
                         nn.Flatten) + _POOL_MODULES  # fmt: skip


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
        self._edge_bytes = max_kernel_size * _itemsize(dtype) + 3 * 8
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
        ids = torch.arange(self.e, self.e + count)
        self.e += count
        self.src.append(src.long().cpu())
        self.dst.append(dst.long().cpu())
        self.etype.append(torch.full((count,), int(etype), dtype=torch.long))
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
            rows=rows.long().cpu().clone(), col=col, width=width,
        )  # fmt: skip
        self.slot_owner[key] = where


# ----------------------------------------------------------------------------- tracer
def _tagged(exc: Exception) -> Exception:
    """Remember the message: fx.Interpreter appends its own context to escaping errors."""
    exc.metanet_message = str(exc)  # type: ignore[attr-defined]
    return exc


def _module_path(n: fx.Node) -> str:
    if n.op == "call_module":
        return str(n.target)
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


class _Tracer(fx.Interpreter):
    """Runs the traced graph on concrete inputs and builds the parameter graph alongside."""

    def __init__(self, gm: fx.GraphModule, builder: _Builder, input_axis: int) -> None:
        super().__init__(gm)
        self.b = builder
        self.input_axis = input_axis
        self.info: dict[fx.Node, Any] = {}
        self.params = dict(gm.named_parameters(remove_duplicate=False))
        self.buffers = dict(gm.named_buffers(remove_duplicate=False))
        self.output_nv: _NV | None = None
        self.called: set[str] = set()

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
        else:
            out.append(obj)
        return out

    def _pass(self, n: fx.Node, src: fx.Node, nv: _NV, result: Any, axis: int | None = None) -> _NV:
        """Same neurons as ``nv`` (the value of fx node ``src``), maybe on another axis."""
        axis = nv.axis if axis is None else axis
        exclusive = nv.exclusive and len(src.users) == 1
        out = _NV(nv.nodes, axis, nv.depth, exclusive)
        self._check_axis(n, out, result)
        return out

    def _check_axis(self, n: fx.Node, nv: _NV, result: Any) -> None:
        if not isinstance(result, Tensor):
            raise self._err(n, "expected a tensor result")
        if nv.axis >= result.dim() or result.shape[nv.axis] != nv.nodes.numel():
            raise self._err(
                n,
                f"result shape {tuple(result.shape)} does not keep the {nv.nodes.numel()} "
                f"neurons on axis {nv.axis}",
            )

    def _require_axis(self, n: fx.Node, nv: _NV, x: Tensor, axis: int, what: str,
                      module: nn.Module | None = None) -> None:  # fmt: skip
        if nv.axis != axis:
            raise self._err(
                n,
                f"{what} acts on axis {axis} of a {tuple(x.shape)} tensor whose neurons lie on "
                f"axis {nv.axis}",
                module,
            )

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
            if isinstance(result, Tensor):
                return _Opaque(f"attribute '{key}'", key if key in self.params else None)
            return None
        if n.op == "output":
            return self._output(n)
        args, kwargs = self._nv_args(n)
        neuron_inputs = [a for a in self._flat((args, kwargs)) if isinstance(a, (_NV, _Tuple))]
        if n.op == "call_module":
            module = self.module.get_submodule(str(n.target))
            return self._call_module(n, module, args, kwargs, result)
        if n.op == "call_function":
            handled = self._call_function(n, args, kwargs, result)
        else:
            handled = self._call_method(n, args, kwargs, result)
        if handled is not NotImplemented:
            return handled
        if neuron_inputs:
            raise self._err(n, "no parameter-graph construction for this op on neuron values")
        return _Opaque(f"result of {n.name}") if isinstance(result, Tensor) else None

    def _placeholder(self, n: fx.Node, result: Any) -> Any:
        if not isinstance(result, Tensor):
            return None
        if any(isinstance(v, _NV) for v in self.info.values()):
            raise self._err(n, "only modules with a single tensor input are supported")
        axis = self.input_axis if result.dim() > 1 else 0
        count = int(result.shape[axis])
        ids = self.b.add_nodes(count, NodeType.INPUT, 0, pos=torch.arange(count))
        return _NV(ids, axis, 0, exclusive=False)

    def _output(self, n: fx.Node) -> None:
        args, _ = self._nv_args(n)
        outs = [a for a in self._flat(args) if a is not None]
        if len(outs) != 1 or not isinstance(outs[0], _NV):
            raise self._err(n, "the module must return exactly one tensor computed from its input")
        self.output_nv = outs[0]
        return None

    # -- parametric constructions
    def _dense(self, n: fx.Node, nv: _NV, out_count: int, weight: Tensor, w_key: str,
               bias: Tensor | None, b_key: str | None, etype: EdgeType) -> _NV:  # fmt: skip
        """Linear or conv: new neurons, one edge per (out, in) pair carrying w[out, in]."""
        where = _module_path(n)
        in_count = nv.nodes.numel()
        width = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
        if width > self.b.k:
            raise _tagged(
                ValueError(
                    f"conv '{where}' has a kernel of shape {tuple(weight.shape[2:])} ({width} "
                    f"elements), more than max_kernel_size={self.b.k}; "
                    "pass a larger max_kernel_size"
                )
            )
        out = self.b.add_nodes(out_count, NodeType.HIDDEN, nv.depth + 1)
        dst = out.repeat_interleave(in_count)
        src = nv.nodes.repeat(out_count)
        eids = self.b.add_edges(src, dst, etype, weight.reshape(out_count * in_count, width))
        self.b.add_slot(w_key, weight, "edge", eids, 0, width, where)
        if bias is not None and b_key is not None:
            self.b.set_node_values(out, NODE_BIAS, bias)
            self.b.add_slot(b_key, bias, "node", out, NODE_BIAS, 1, where)
        return _NV(out, nv.axis, nv.depth + 1, exclusive=True)

    def _norm(self, n: fx.Node, module: nn.Module, nv: _NV, prefix: str) -> _NV:
        where = str(n.target)
        c = nv.nodes.numel()
        out = self.b.add_nodes(c, NodeType.NORM, nv.depth + 1)
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        eids = self.b.add_edges(nv.nodes, out, EdgeType.NORM, weight)
        if weight is not None:
            self.b.add_slot(prefix + "weight", weight, "edge", eids, 0, 1, where)
        if bias is not None:
            self.b.set_node_values(out, NODE_BIAS, bias)
            self.b.add_slot(prefix + "bias", bias, "node", out, NODE_BIAS, 1, where)
        for name, col in (("running_mean", NODE_RUNNING_MEAN), ("running_var", NODE_RUNNING_VAR)):
            stat = getattr(module, name, None)
            if isinstance(stat, Tensor):
                self.b.set_node_values(out, col, stat)
                self.b.add_slot(prefix + name, stat, "node", out, col, 1, where)
        if isinstance(module, nn.GroupNorm) and 1 < module.num_groups < c:
            g = module.num_groups
            groups = self.b.add_nodes(g, NodeType.GROUP, nv.depth + 1)
            self.b.add_edges(groups.repeat_interleave(c // g), out, EdgeType.GROUP)
        return _NV(out, nv.axis, nv.depth + 1, exclusive=True)

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
        where = str(n.target)
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

    def _reshape(self, n: fx.Node, src: fx.Node, nv: _NV, x: Tensor, result: Tensor) -> _NV:
        """Flatten-like reshapes: keep the axes before the neurons, merge the neuron axis with
        all later axes (flatten) or keep it (reshape of the later axes only)."""
        a = nv.axis
        s_in, s_out = tuple(x.shape), tuple(result.shape)
        if s_out[:a] != s_in[:a] or len(s_out) <= a:
            raise self._err(n, f"reshape {s_in} -> {s_out} mixes the neuron axis {a}")
        if s_out[a] == s_in[a]:
            return self._pass(n, src, nv, result)
        spatial = math.prod(s_in[a + 1 :])
        if len(s_out) != a + 1 or s_out[a] != s_in[a] * spatial:
            raise self._err(n, f"reshape {s_in} -> {s_out} is not a flatten of axis {a} onwards")
        c = nv.nodes.numel()
        pos = torch.arange(spatial).repeat(c)
        flat = self.b.add_nodes(c * spatial, NodeType.FLATTEN, nv.depth, pos=pos)
        self.b.add_edges(nv.nodes.repeat_interleave(spatial), flat, EdgeType.FLATTEN)
        out = _NV(flat, a, nv.depth, exclusive=True)
        self._check_axis(n, out, result)
        return out

    def _add(self, n: fx.Node, a: Any, b: Any, alpha: float, result: Any) -> _NV:
        if not (isinstance(a, _NV) and isinstance(b, _NV)):
            raise self._err(n, "only the sum of two neuron values (a residual) is supported")
        if a.nodes.numel() != b.nodes.numel() or a.axis != b.axis:
            raise self._err(n, "the residual operands have different neuron sets / axes")
        fa, fb = n.args[0], n.args[1]
        a_ok = a.exclusive and len(fa.users) == 1 and not torch.equal(a.nodes, b.nodes)
        b_ok = b.exclusive and len(fb.users) == 1 and not torch.equal(a.nodes, b.nodes)
        b_ok = b_ok and alpha == 1.0  # alpha scales b: b cannot carry the sum
        if b_ok and (not a_ok or int(b.nodes.max()) > int(a.nodes.max())):
            # merge into b: a's neurons feed b's with weight 1, b keeps its own
            self.b.add_edges(a.nodes, b.nodes, EdgeType.RESIDUAL,
                             torch.ones(a.nodes.numel()))  # fmt: skip
            out = _NV(b.nodes, b.axis, max(a.depth, b.depth), exclusive=True)
        elif a_ok:
            self.b.add_edges(b.nodes, a.nodes, EdgeType.RESIDUAL,
                             torch.full((b.nodes.numel(),), float(alpha)))  # fmt: skip
            out = _NV(a.nodes, a.axis, max(a.depth, b.depth), exclusive=True)
        else:
            depth = max(a.depth, b.depth)
            s = self.b.add_nodes(a.nodes.numel(), NodeType.SUM, depth)
            self.b.add_edges(a.nodes, s, EdgeType.RESIDUAL, torch.ones(a.nodes.numel()))
            self.b.add_edges(b.nodes, s, EdgeType.RESIDUAL,
                             torch.full((b.nodes.numel(),), float(alpha)))  # fmt: skip
            out = _NV(s, a.axis, depth, exclusive=True)
        self._check_axis(n, out, result)
        return out

    def _reduce(self, n: fx.Node, nv: _NV, x: Tensor, dims: Any, keepdim: bool, result: Any) -> _NV:
        if dims is None:
            raise self._err(n, "reduction over all axes mixes neurons")
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = sorted(d % x.dim() for d in dims)
        if nv.axis in dims:
            raise self._err(n, f"reduction over the neuron axis {nv.axis}")
        axis = nv.axis if keepdim else nv.axis - sum(d < nv.axis for d in dims)
        return self._pass(n, n.args[0], nv, result, axis)

    # -- dispatch
    def _call_module(self, n: fx.Node, m: nn.Module, args: tuple, kwargs: dict, result: Any) -> Any:
        path = str(n.target)
        if path in self.called and any(True for _ in m.parameters(recurse=False)):
            raise self._err(n, "module called twice (weight sharing is not supported)", m)
        self.called.add(path)
        concrete = self._concrete(n)
        prefix = path + "."
        nv = args[0] if args else None
        if not isinstance(m, nn.MultiheadAttention) and not isinstance(nv, _NV):
            if any(isinstance(a, _NV) for a in self._flat((args, kwargs))) or any(
                True for _ in m.parameters()
            ):
                raise self._err(n, "its first argument is not computed from the module input", m)
            return _Opaque(f"result of {n.name}") if isinstance(result, Tensor) else None
        if isinstance(m, nn.Linear):
            x = concrete[0]
            self._require_axis(n, nv, x, x.dim() - 1, "Linear", m)
            return self._dense(n, nv, m.out_features, m.weight, prefix + "weight", m.bias,
                               prefix + "bias", EdgeType.LINEAR)  # fmt: skip
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            if m.groups != 1:
                raise self._err(n, f"grouped convolution (groups={m.groups})", m)
            x = concrete[0]
            kdim = 1 if isinstance(m, nn.Conv1d) else 2
            self._require_axis(n, nv, x, x.dim() - kdim - 1, type(m).__name__, m)
            return self._dense(n, nv, m.out_channels, m.weight, prefix + "weight", m.bias,
                               prefix + "bias", EdgeType.CONV)  # fmt: skip
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)):
            x = concrete[0]
            self._require_axis(n, nv, x, 1 if x.dim() > 1 else 0, type(m).__name__, m)
            return self._norm(n, m, nv, prefix)
        if isinstance(m, nn.LayerNorm):
            x = concrete[0]
            if len(m.normalized_shape) != 1:
                raise self._err(n, f"normalized_shape {m.normalized_shape} spans several axes", m)
            self._require_axis(n, nv, x, x.dim() - 1, "LayerNorm", m)
            return self._norm(n, m, nv, prefix)
        if isinstance(m, nn.MultiheadAttention):
            return self._attention(n, m, args, kwargs, concrete)
        if any(True for _ in m.parameters(recurse=False)):
            raise self._err(n, "module with parameters that has no graph construction", m)
        if isinstance(m, _ELEMENTWISE_MODULES):
            return self._pass(n, n.args[0], nv, result)
        if isinstance(m, _POOL_MODULES):
            x = concrete[0]
            if x.dim() < 3 or nv.axis != x.dim() - (1 if "1d" in type(m).__name__ else 2) - 1:
                raise self._err(n, f"pooling needs the neurons on the channel axis of {x.shape}", m)
            return self._pass(n, n.args[0], nv, result)
        if isinstance(m, nn.Flatten):
            return self._reshape(n, n.args[0], nv, concrete[0], result)
        raise self._err(n, "no parameter-graph construction for this module", m)

    def _concrete(self, n: fx.Node) -> tuple:
        args, _ = self.fetch_args_kwargs_from_env(n)
        return args

    def _call_function(self, n: fx.Node, args: tuple, kwargs: dict, result: Any) -> Any:
        t = n.target
        nv = args[0] if args else None
        if t in _ELEMENTWISE_FUNCTIONS and isinstance(nv, _NV):
            if any(isinstance(a, (_NV, _Opaque)) for a in self._flat((args[1:], kwargs))):
                raise self._err(n, "elementwise op with a second tensor operand")
            return self._pass(n, n.args[0], nv, result)
        if t in _POOL_FUNCTIONS and isinstance(nv, _NV):
            x = self._concrete(n)[0]
            ks = 1 if t.__name__.endswith("1d") else 2
            if x.dim() < 3 or nv.axis != x.dim() - ks - 1:
                raise self._err(n, f"pooling needs the neurons on the channel axis of {x.shape}")
            return self._pass(n, n.args[0], nv, result)
        if t in _ADD_FUNCTIONS:
            alpha = float(kwargs.get("alpha", 1.0)) if t in (torch.add, torch.sub) else 1.0
            if t in (operator.sub, operator.isub, torch.sub):
                alpha = -alpha
            if len(args) < 2:
                return NotImplemented
            return self._add(n, args[0], args[1], alpha, result)
        if t in _MUL_FUNCTIONS:
            return self._scalar_mul(n, t, args, result)
        if t is torch.flatten and isinstance(nv, _NV):
            return self._reshape(n, n.args[0], nv, self._concrete(n)[0], result)
        if t in _REDUCE_FUNCTIONS and isinstance(nv, _NV):
            dims = args[1] if len(args) > 1 else kwargs.get("dim")
            keepdim = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
            return self._reduce(n, nv, self._concrete(n)[0], dims, keepdim, result)
        if t is operator.getitem and isinstance(nv, _Tuple):
            return nv.items[args[1]]
        if t is getattr and isinstance(nv, _NV) and args[1] in ("shape", "dtype", "device", "ndim"):
            return None
        if t in (F.linear, F.conv1d, F.conv2d) and isinstance(nv, _NV):
            return self._functional_dense(n, t, args, kwargs)
        return NotImplemented

    def _scalar_mul(self, n: fx.Node, t: Callable, args: tuple, result: Any) -> Any:
        a, b = args[0], args[1] if len(args) > 1 else None
        concrete = self._concrete(n)
        is_num = [not isinstance(c, Tensor) for c in concrete[:2]]
        div = t in (operator.truediv, torch.div)
        if isinstance(a, _NV) and is_num[1]:
            return self._pass(n, n.args[0], a, result)
        if isinstance(b, _NV) and is_num[0] and not div:
            return self._pass(n, n.args[1], b, result)
        if isinstance(a, _NV) or isinstance(b, _NV):
            raise self._err(n, "only multiplication / division by a Python number is supported")
        return NotImplemented

    def _functional_dense(self, n: fx.Node, t: Callable, args: tuple, kwargs: dict) -> _NV:
        nv = args[0]
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        if not (isinstance(w, _Opaque) and w.param_key):
            raise self._err(n, "the weight is not a parameter of the module")
        if b is not None and not (isinstance(b, _Opaque) and b.param_key):
            raise self._err(n, "the bias is not a parameter of the module")
        weight = self.params[w.param_key]
        bias = self.params[b.param_key] if b is not None else None
        x = self._concrete(n)[0]
        if t is F.linear:
            self._require_axis(n, nv, x, x.dim() - 1, "linear")
            etype = EdgeType.LINEAR
        else:
            groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
            if groups != 1:
                raise self._err(n, f"grouped convolution (groups={groups})")
            self._require_axis(n, nv, x, x.dim() - (weight.dim() - 2) - 1, "conv")
            etype = EdgeType.CONV
        return self._dense(n, nv, weight.shape[0], weight, w.param_key, bias,
                           b.param_key if b is not None else None, etype)  # fmt: skip

    def _call_method(self, n: fx.Node, args: tuple, kwargs: dict, result: Any) -> Any:
        name = str(n.target)
        nv = args[0] if args else None
        if not isinstance(nv, _NV):
            return NotImplemented
        x = self._concrete(n)[0]
        if name in _META_METHODS:
            return None
        if name in _ELEMENTWISE_METHODS:
            return self._pass(n, n.args[0], nv, result)
        if name in ("view", "reshape", "flatten"):
            return self._reshape(n, n.args[0], nv, x, result)
        if name in ("mean", "sum", "amax"):
            dims = args[1] if len(args) > 1 else kwargs.get("dim")
            keepdim = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
            return self._reduce(n, nv, x, dims, keepdim, result)
        if name == "transpose":
            d0, d1 = (int(d) % x.dim() for d in args[1:3])
            axis = d1 if nv.axis == d0 else d0 if nv.axis == d1 else nv.axis
            return self._pass(n, n.args[0], nv, result, axis)
        if name == "permute":
            dims = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
            dims = [int(d) % x.dim() for d in dims]
            return self._pass(n, n.args[0], nv, result, dims.index(nv.axis))
        if name in ("add", "sub") and len(args) > 1:
            alpha = float(kwargs.get("alpha", 1.0)) * (-1.0 if name == "sub" else 1.0)
            return self._add(n, args[0], args[1], alpha, result)
        if name in ("mul", "div"):
            return self._scalar_mul(n, torch.mul if name == "mul" else torch.div, args, result)
        return NotImplemented
