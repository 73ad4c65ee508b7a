"""``ArchGraph``: the op-level computational graph of a module, the input of graph hypernetworks.

``ArchGraph.from_module(module)`` traces ``module`` with ``torch.fx.symbolic_trace`` and keeps one
node per tensor op, typed by the op (``OPS``: ``conv``, ``linear``, ``batchnorm``, ``relu``,
``add``, ``avgpool``, ``flatten``, ``attention``, ``input``, ``output`` ...), with directed
data-flow edges ``src -> dst``. Pass-through ops (dropout, identity, ``getitem`` of a tuple output,
``contiguous``) are removed and their inputs wired to their users; shape queries (``x.size()``)
are not ops. Nodes of parametrised ops record their parameters (``role -> full parameter name``
and shape), which is what a GHN predicts.

An op outside :data:`OPS` (e.g. ``nn.LSTM``) is kept as a node with ``known=False`` and its
``module_path``; the GHN then raises or falls back (see :meth:`metanet.hyper.ghn.GHN.apply`).
A module whose ``forward`` cannot be traced raises :class:`ArchTraceError` naming the deepest
submodule (path and class) that fails to trace.

Node features (:meth:`ArchGraph.shape_features`, ``[N, 8]``), after GHN-2's shape encoding:
``log2`` of (out, in) sizes of the op's main parameter (0 without), kernel height/width, stride,
``log2`` of the number of output channels/features when known, and two flags (has bias, is last
parametrised op before the output).
"""

from __future__ import annotations

import math
import operator
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["OPS", "ArchGraph", "ArchNode", "ArchTraceError"]

#: The op vocabulary (index = position). ``unknown`` stands for any op outside it.
OPS: tuple[str, ...] = (
    "input", "output", "linear", "conv", "batchnorm", "layernorm", "groupnorm", "attention",
    "relu", "leaky_relu", "gelu", "silu", "tanh", "sigmoid", "elu", "sine", "softmax",
    "add", "mul", "cat", "maxpool", "avgpool", "global_pool", "flatten", "reshape", "unknown",
)  # fmt: skip

_MODULE_OPS: dict[type, str] = {
    nn.Linear: "linear", nn.Conv1d: "conv", nn.Conv2d: "conv", nn.Conv3d: "conv",
    nn.BatchNorm1d: "batchnorm", nn.BatchNorm2d: "batchnorm", nn.LayerNorm: "layernorm",
    nn.GroupNorm: "groupnorm", nn.MultiheadAttention: "attention",
    nn.ReLU: "relu", nn.ReLU6: "relu", nn.LeakyReLU: "leaky_relu", nn.GELU: "gelu",
    nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.ELU: "elu",
    nn.Softmax: "softmax", nn.MaxPool1d: "maxpool", nn.MaxPool2d: "maxpool",
    nn.AvgPool1d: "avgpool", nn.AvgPool2d: "avgpool", nn.AdaptiveAvgPool1d: "global_pool",
    nn.AdaptiveAvgPool2d: "global_pool", nn.AdaptiveMaxPool2d: "global_pool",
    nn.Flatten: "flatten", nn.Unflatten: "reshape",
}  # fmt: skip
_PASS_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.AlphaDropout)

_FUNCTION_OPS: dict[Any, str] = {
    F.relu: "relu", torch.relu: "relu", F.leaky_relu: "leaky_relu", F.gelu: "gelu",
    F.silu: "silu", torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid", F.elu: "elu", torch.sin: "sine", F.softmax: "softmax",
    torch.softmax: "softmax", operator.add: "add", torch.add: "add", operator.sub: "add",
    torch.sub: "add", operator.iadd: "add", operator.mul: "mul", torch.mul: "mul",
    operator.truediv: "mul", torch.cat: "cat", torch.concat: "cat", torch.flatten: "flatten",
    torch.reshape: "reshape", F.max_pool2d: "maxpool", F.avg_pool2d: "avgpool",
    F.adaptive_avg_pool2d: "global_pool", torch.mean: "global_pool", F.linear: "linear",
    F.conv2d: "conv", F.conv1d: "conv", F.layer_norm: "layernorm", F.group_norm: "groupnorm",
    F.batch_norm: "batchnorm",
}  # fmt: skip
_METHOD_OPS: dict[str, str] = {
    "relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "sin": "sine", "softmax": "softmax",
    "add": "add", "add_": "add", "sub": "add", "mul": "mul", "mul_": "mul", "div": "mul",
    "flatten": "flatten", "view": "reshape", "reshape": "reshape", "permute": "reshape",
    "transpose": "reshape", "mean": "global_pool", "sum": "global_pool", "amax": "global_pool",
}  # fmt: skip
_PASS_FUNCTIONS = {operator.getitem, F.dropout, torch.clone}
_PASS_METHODS = {"contiguous", "clone", "float", "to", "type_as"}
_NON_TENSOR_FUNCTIONS = {getattr, len}
_NON_TENSOR_METHODS = {"size", "dim", "numel"}
# positional index of weight / bias in functional calls of parametrised ops
_FUNCTIONAL_PARAM_ARGS = {"linear": (1, 2), "conv": (1, 2), "layernorm": (2, 3),
                          "groupnorm": (2, 3), "batchnorm": (3, 4)}  # fmt: skip


class _ArchTracer(fx.Tracer):
    """fx tracer whose leaves also include subclasses of known ops (a custom ``GroupNorm``
    subclass is a ``groupnorm`` op, not traced through)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, tuple(_MODULE_OPS)) or isinstance(m, _PASS_MODULES):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace(module: nn.Module) -> fx.GraphModule:
    tracer = _ArchTracer()
    graph = tracer.trace(module)
    return fx.GraphModule(tracer.root, graph)


def _module_op(mod: nn.Module) -> str:
    """The op of a module: its class (or nearest known base class) in the vocabulary."""
    for klass in type(mod).__mro__:
        if klass in _MODULE_OPS:
            return _MODULE_OPS[klass]
    return type(mod).__name__.lower()


class ArchTraceError(ValueError):
    """A module whose ``forward`` cannot be traced by torch.fx (message names the module path)."""


@dataclass
class ArchNode:
    """One op of an :class:`ArchGraph`.

    Attributes:
        name: the fx node name (unique).
        op: the op type (an entry of :data:`OPS`, or the lower-cased op name when unknown).
        module_path: dotted path of the module that runs the op ('' for the root / functions).
        params: ``role -> full parameter name`` (``{"weight": "0.weight", "bias": "0.bias"}``).
        shapes: ``role -> parameter shape``.
        known: whether ``op`` is in :data:`OPS`.
        attrs: op attributes used as features (``stride``, ``kernel``, ``channels``).
    """

    name: str
    op: str
    module_path: str = ""
    params: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    known: bool = True
    attrs: dict[str, Any] = field(default_factory=dict)


def _first_untraceable(module: nn.Module, path: str = "") -> tuple[str, nn.Module, str] | None:
    """Deepest submodule whose forward fails to trace (path, module, error message)."""
    for name, child in module.named_children():
        if _is_torch_leaf(child):
            continue  # leaves of the trace
        sub = f"{path}.{name}" if path else name
        found = _first_untraceable(child, sub)
        if found is not None:
            return found
    try:
        _trace(module)
    except Exception as exc:  # noqa: BLE001 - any trace failure is reported
        return path, module, f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


class ArchGraph:
    """Op-level DAG of a module: ``nodes`` (:class:`ArchNode`) and ``edge_index [2, E]``.

    Nodes are in a topological order (fx order): every edge goes from a lower to a higher index.
    """

    def __init__(self, nodes: list[ArchNode], edges: list[tuple[int, int]]) -> None:
        self.nodes = nodes
        uniq = sorted(set(edges))
        self.edge_index = (
            torch.tensor(uniq, dtype=torch.long).t().contiguous()
            if uniq
            else torch.zeros(2, 0, dtype=torch.long)
        )

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: nn.Module) -> ArchGraph:
        """Trace ``module`` (torch.fx) into an :class:`ArchGraph`.

        Raises:
            ArchTraceError: ``forward`` of ``module`` (or of one of its submodules, named in the
                message with its class) cannot be symbolically traced.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"ArchGraph.from_module needs an nn.Module, got {type(module).__name__}"
            )
        if _is_torch_leaf(module):
            return cls._from_leaf(module)
        try:
            gm = _trace(module)
        except Exception as exc:  # noqa: BLE001
            found = _first_untraceable(module)
            path, sub, msg = found if found is not None else ("", module, str(exc))
            where = f"submodule '{path}'" if path else "the root module"
            raise ArchTraceError(
                f"cannot trace forward() of {where} ({type(sub).__name__}) with torch.fx: {msg}"
            ) from exc
        return cls._from_graph_module(gm, module)

    @classmethod
    def _from_leaf(cls, module: nn.Module) -> ArchGraph:
        """A torch.nn built-in module as the root: ``input -> op -> output``."""
        op = _module_op(module)
        node = ArchNode(type(module).__name__.lower(), op, "", known=op in OPS,
                        params={r: r for r, _ in module.named_parameters()},
                        shapes={r: tuple(p.shape) for r, p in module.named_parameters()},
                        attrs=_module_attrs(module))  # fmt: skip
        graph = cls([ArchNode("input", "input"), node, ArchNode("output", "output")],
                    [(0, 1), (1, 2)])  # fmt: skip
        graph._mark_last(module)
        return graph

    @classmethod
    def _from_graph_module(cls, gm: fx.GraphModule, root: nn.Module) -> ArchGraph:
        modules = dict(root.named_modules())
        params = dict(root.named_parameters())
        nodes: list[ArchNode] = []
        edges: list[tuple[int, int]] = []
        rep: dict[fx.Node, list[int]] = {}  # fx node -> arch nodes carrying its value
        attr_params: dict[fx.Node, str] = {}  # get_attr nodes that are parameters

        def inputs_of(n: fx.Node) -> list[int]:
            out: list[int] = []
            for a in n.all_input_nodes:
                out += rep.get(a, [])
            return sorted(set(out))

        def add(n: fx.Node, op: str, path: str = "", **kw: Any) -> None:
            idx = len(nodes)
            nodes.append(ArchNode(n.name, op, path, known=op in OPS, **kw))
            edges.extend((s, idx) for s in inputs_of(n))
            rep[n] = [idx]

        for n in gm.graph.nodes:
            if n.op == "placeholder":
                add(n, "input")
            elif n.op == "output":
                add(n, "output")
            elif n.op == "get_attr":
                if n.target in params:
                    attr_params[n] = str(n.target)
                rep[n] = []
            elif n.op == "call_module":
                path = str(n.target)
                mod = modules[path]
                if isinstance(mod, _PASS_MODULES):
                    rep[n] = inputs_of(n)
                    continue
                op = _module_op(mod)
                own = {r: f"{path}.{r}" for r, _ in mod.named_parameters()}
                shapes = {r: tuple(p.shape) for r, p in mod.named_parameters()}
                add(n, op, path, params=own, shapes=shapes, attrs=_module_attrs(mod))
            elif n.op == "call_function":
                if n.target in _NON_TENSOR_FUNCTIONS:
                    rep[n] = []
                    continue
                if n.target in _PASS_FUNCTIONS:
                    rep[n] = inputs_of(n)
                    continue
                op = _FUNCTION_OPS.get(n.target, getattr(n.target, "__name__", str(n.target)))
                own, shapes = {}, {}
                for role, pos in zip(("weight", "bias"), _FUNCTIONAL_PARAM_ARGS.get(op, ())):
                    arg = n.args[pos] if len(n.args) > pos else n.kwargs.get(role)
                    if isinstance(arg, fx.Node) and arg in attr_params:
                        own[role] = attr_params[arg]
                        shapes[role] = tuple(params[own[role]].shape)
                for arg in n.all_input_nodes:  # parameters consumed by an unknown function
                    if arg in attr_params and attr_params[arg] not in own.values():
                        own[f"arg:{arg.name}"] = attr_params[arg]
                        shapes[f"arg:{arg.name}"] = tuple(params[attr_params[arg]].shape)
                add(n, op, _stack_path(n), params=own, shapes=shapes)
            elif n.op == "call_method":
                if n.target in _NON_TENSOR_METHODS:
                    rep[n] = []
                    continue
                if n.target in _PASS_METHODS:
                    rep[n] = inputs_of(n)
                    continue
                add(n, _METHOD_OPS.get(str(n.target), str(n.target)), _stack_path(n))
        graph = cls(nodes, edges)
        graph._mark_last(root)
        return graph

    def _mark_last(self, root: nn.Module) -> None:
        """Flag parametrised ops from which the output is reached without another one."""
        succ: dict[int, list[int]] = {i: [] for i in range(len(self.nodes))}
        for s, d in self.edge_index.t().tolist():
            succ[s].append(d)
        for i, node in enumerate(self.nodes):
            if not node.params:
                continue
            seen, queue, last = {i}, deque(succ[i]), True
            while queue and last:
                j = queue.popleft()
                if j in seen:
                    continue
                seen.add(j)
                if self.nodes[j].params:
                    last = False
                queue.extend(succ[j])
            node.attrs["last"] = last

    # -- views ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    def ops(self) -> list[str]:
        """Op type of every node."""
        return [n.op for n in self.nodes]

    def unknown_nodes(self) -> list[ArchNode]:
        """Nodes whose op is outside :data:`OPS`."""
        return [n for n in self.nodes if not n.known]

    def op_index(self, vocab: tuple[str, ...] = OPS) -> Tensor:
        """``[N]`` long: index of each node's op in ``vocab`` (that of ``unknown`` if absent)."""
        unk = vocab.index("unknown")
        return torch.tensor([vocab.index(n.op) if n.op in vocab else unk for n in self.nodes],
                            dtype=torch.long)  # fmt: skip

    def shape_features(self) -> Tensor:
        """``[N, 8]`` float shape features (see the module docstring)."""
        rows = []
        for n in self.nodes:
            main = _main_shape(n)
            out_f = math.log2(main[0]) if main else 0.0
            in_f = math.log2(main[1]) if main and len(main) > 1 else 0.0
            kh = float(main[2]) if main and len(main) > 2 else 0.0
            kw = float(main[3]) if main and len(main) > 3 else kh
            stride = float(n.attrs.get("stride", 0))
            ch = n.attrs.get("channels")
            rows.append([out_f, in_f, kh, kw, stride, math.log2(ch) if ch else 0.0,
                         float("bias" in n.params), float(n.attrs.get("last", False))])  # fmt: skip
        return torch.tensor(rows, dtype=torch.float32)

    def virtual_edges(self, max_dist: int = 3) -> tuple[Tensor, Tensor]:
        """GHN-2's virtual edges: ``(edge_index [2, E'], dist [E'])`` for every pair at
        shortest-path distance ``1 <= d <= max_dist`` along the data flow (``d = 1``: real
        edges)."""
        n = len(self.nodes)
        succ: list[list[int]] = [[] for _ in range(n)]
        for s, d in self.edge_index.t().tolist():
            succ[s].append(d)
        src, dst, dist = [], [], []
        for s in range(n):
            frontier, seen = [s], {s}
            for d in range(1, max_dist + 1):
                nxt = []
                for u in frontier:
                    for v in succ[u]:
                        if v not in seen:
                            seen.add(v)
                            nxt.append(v)
                            src.append(s)
                            dst.append(v)
                            dist.append(d)
                frontier = nxt
        if not src:
            return torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        return torch.tensor([src, dst], dtype=torch.long), torch.tensor(dist, dtype=torch.long)

    def to_networkx(self):
        """A ``networkx.DiGraph`` with node attributes ``op``, ``module_path``, ``params``."""
        import networkx as nx

        g = nx.DiGraph()
        for i, n in enumerate(self.nodes):
            g.add_node(i, name=n.name, op=n.op, module_path=n.module_path, params=dict(n.params))
        g.add_edges_from(self.edge_index.t().tolist())
        return g

    def __repr__(self) -> str:
        return f"ArchGraph(nodes={len(self.nodes)}, edges={self.num_edges}, ops={self.ops()})"


def _is_torch_leaf(module: nn.Module) -> bool:
    """A built-in torch.nn layer (not a container): a leaf of fx traces."""
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    if isinstance(module, containers):
        return False
    return type(module).__module__.startswith("torch.nn.modules") or isinstance(
        module, tuple(_MODULE_OPS)
    )


def _stack_path(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") if hasattr(n, "meta") else None
    if stack:
        last = list(stack.values())[-1]
        return str(last[0] if isinstance(last, tuple) else last)
    return ""


def _module_attrs(mod: nn.Module) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        attrs["stride"] = int(mod.stride[0])
        attrs["channels"] = int(mod.out_channels)
        if mod.groups != 1:
            attrs["groups"] = int(mod.groups)
    elif isinstance(mod, nn.Linear):
        attrs["channels"] = int(mod.out_features)
    elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        attrs["channels"] = int(mod.num_features)
    elif isinstance(mod, nn.GroupNorm):
        attrs["channels"] = int(mod.num_channels)
    elif isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d)):
        s = mod.stride if mod.stride is not None else mod.kernel_size
        attrs["stride"] = int(s if isinstance(s, int) else s[0])
    return attrs


def _main_shape(n: ArchNode) -> tuple[int, ...] | None:
    for role in ("weight", "in_proj_weight"):
        if role in n.shapes:
            return n.shapes[role]
    return next(iter(n.shapes.values()), None) if n.shapes else None
