"""``ArchGraph``: the op-level computational graph of a module, the input of graph hypernetworks.

``ArchGraph.from_module(module, example_input=None)`` records the forward that actually runs
(:func:`metanet.graph.recorder.record`, the tracer behind :func:`metanet.graph.from_module` too,
in ``eval()`` mode: dropout and stochastic depth are the identity and do not appear) and keeps
one node per tensor op, typed by the op (``OPS``: ``conv``, ``group_conv``, ``linear``,
``embedding``, ``batchnorm``, ``layernorm``, ``rmsnorm``, ``attention``, ``sdpa``, ``matmul``,
``relu``, ``hardswish``, ``add``, ``mul``, ``layer_scale``, ``reshape``, ``permute``, ``input``,
``output`` ...), with directed data-flow edges ``src -> dst``. So Hugging Face GPT-2 / BERT /
ViT / Llama and the CNN families that ``torch.fx`` symbolic tracing cannot follow trace here.

* Layers are recorded as one op (the leaves of :func:`metanet.graph.fx_builder.is_leaf`, plus
  RMSNorm-like modules (class name ending in ``RMSNorm`` with one 1-d ``weight``) and Hugging
  Face activation modules); a subclass that re-implements ``forward`` is recorded through.
* Pass-through ops (dropout, identity, ``getitem`` / slicing, ``contiguous``, dtype casts) are
  removed and their inputs wired to their users. Shape arithmetic (``x.size(1) // 2``),
  comparisons and masks (``eq``, ``floordiv``, ``ones_like``, ``arange`` ...) and values computed
  from constants alone are not ops of the graph.
* A parameter consumed outside a layer (ConvNeXt's layer scale ``gamma * x``, ViT's
  ``cls_token`` / ``position_embeddings``) is a parameter of the op that consumes it; ``x * p``
  with a 1-d ``p`` (after dropping size-1 axes) is a ``layer_scale`` op. Views of a parameter
  (``p.expand(...)``, ``w.t()``) stay that parameter.
* A tensor shared by several names (GPT-2's ``lm_head.weight`` / ``transformer.wte.weight``) is
  named by its first name in ``module.named_parameters()``; :attr:`ArchGraph.tied` maps the
  other names to it.

Without ``example_input`` an input is guessed: Hugging Face models from their config
(``input_ids`` of ``vocab_size``, ``pixel_values`` of ``image_size``), other modules from their
first layer (a Linear's ``in_features``, square images of a few sizes for a conv).

An op outside :data:`OPS` (e.g. ``nn.LSTM``, ``torch.cumsum``) is kept as a node with
``known=False`` and its ``module_path``; the GHN then raises or falls back (see
:meth:`metanet.hyper.ghn.GHN.prepare`). :class:`ArchTraceError` is raised when the forward
branches on a value computed from the input (``if x.sum() > 0``: the op graph would depend on the
input; the message names the submodule path and class) or when no input could be guessed.

Node features (:meth:`ArchGraph.shape_features`, ``[N, 8]``), after GHN-2's shape encoding:
``log2`` of (out, in) sizes of the op's main parameter (0 without), kernel height/width, stride,
``log2`` of the number of output channels/features when known, and two flags (has bias, is last
parametrised op before the output).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from metanet.graph.fx_builder import is_hf_conv1d, is_leaf
from metanet.graph.recorder import record

__all__ = ["OPS", "OP_FALLBACK", "ArchGraph", "ArchNode", "ArchTraceError"]

#: The op vocabulary (index = position). ``unknown`` stands for any op outside it. New ops are
#: appended after ``unknown`` so that the indices of older GHN checkpoints stay valid.
OPS: tuple[str, ...] = (
    "input", "output", "linear", "conv", "batchnorm", "layernorm", "groupnorm", "attention",
    "relu", "leaky_relu", "gelu", "silu", "tanh", "sigmoid", "elu", "sine", "softmax",
    "add", "mul", "cat", "maxpool", "avgpool", "global_pool", "flatten", "reshape", "unknown",
    # appended (metanet-ghn vocabulary v2)
    "hardswish", "hardsigmoid", "group_conv", "embedding", "rmsnorm", "layer_scale", "permute",
    "matmul", "sdpa", "split", "mask", "pad", "elementwise", "upsample",
)  # fmt: skip

#: For each op appended to :data:`OPS`, the older op whose embedding a checkpoint without it
#: starts from (see :meth:`metanet.hyper.ghn.GHN.load`); ``unknown`` when none is close.
OP_FALLBACK: dict[str, str] = {
    "hardswish": "silu", "hardsigmoid": "sigmoid", "group_conv": "conv", "embedding": "linear",
    "rmsnorm": "layernorm", "layer_scale": "mul", "permute": "reshape", "matmul": "mul",
    "sdpa": "attention", "split": "reshape", "mask": "unknown", "pad": "unknown",
    "elementwise": "unknown", "upsample": "unknown",
}  # fmt: skip

_MODULE_OPS: dict[type, str] = {
    nn.Linear: "linear", nn.Conv1d: "conv", nn.Conv2d: "conv", nn.Conv3d: "conv",
    nn.BatchNorm1d: "batchnorm", nn.BatchNorm2d: "batchnorm", nn.LayerNorm: "layernorm",
    nn.GroupNorm: "groupnorm", nn.MultiheadAttention: "attention", nn.Embedding: "embedding",
    nn.ReLU: "relu", nn.ReLU6: "relu", nn.LeakyReLU: "leaky_relu", nn.GELU: "gelu",
    nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.ELU: "elu",
    nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid", nn.Mish: "silu",
    nn.Softmax: "softmax", nn.MaxPool1d: "maxpool", nn.MaxPool2d: "maxpool",
    nn.AvgPool1d: "avgpool", nn.AvgPool2d: "avgpool", nn.AdaptiveAvgPool1d: "global_pool",
    nn.AdaptiveAvgPool2d: "global_pool", nn.AdaptiveMaxPool2d: "global_pool",
    nn.Flatten: "flatten", nn.Unflatten: "reshape", nn.Upsample: "upsample",
}  # fmt: skip
if hasattr(nn, "RMSNorm"):
    _MODULE_OPS[nn.RMSNorm] = "rmsnorm"
_PASS_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.AlphaDropout)

# functions / methods / operators by name (in-place ``_`` stripped) -> op
_NAMED_OPS: dict[str, str] = {
    "relu": "relu", "relu6": "relu", "leaky_relu": "leaky_relu", "gelu": "gelu", "silu": "silu",
    "mish": "silu", "tanh": "tanh", "sigmoid": "sigmoid", "elu": "elu", "selu": "elu",
    "celu": "elu", "sin": "sine", "softmax": "softmax", "log_softmax": "softmax",
    "hardswish": "hardswish", "hardsigmoid": "hardsigmoid",
    "add": "add", "iadd": "add", "sub": "add", "isub": "add", "rsub": "add",
    "mul": "mul", "imul": "mul", "truediv": "mul", "itruediv": "mul", "div": "mul",
    "neg": "mul", "multiply": "mul",
    "cat": "cat", "concat": "cat", "concatenate": "cat", "stack": "cat",
    "flatten": "flatten", "view": "reshape", "reshape": "reshape", "view_as": "reshape",
    "unflatten": "reshape", "squeeze": "reshape", "unsqueeze": "reshape", "expand": "reshape",
    "expand_as": "reshape", "broadcast_to": "reshape", "repeat": "reshape",
    "repeat_interleave": "reshape", "permute": "permute", "transpose": "permute",
    "swapaxes": "permute", "movedim": "permute", "t": "permute", "getattr": "permute",
    "max_pool1d": "maxpool", "max_pool2d": "maxpool", "avg_pool1d": "avgpool",
    "avg_pool2d": "avgpool", "adaptive_avg_pool1d": "global_pool",
    "adaptive_avg_pool2d": "global_pool", "adaptive_max_pool2d": "global_pool",
    "mean": "global_pool", "sum": "global_pool", "amax": "global_pool", "var": "global_pool",
    "linear": "linear", "conv1d": "conv", "conv2d": "conv", "layer_norm": "layernorm",
    "group_norm": "groupnorm", "batch_norm": "batchnorm", "rms_norm": "rmsnorm",
    "embedding": "embedding", "matmul": "matmul", "bmm": "matmul", "einsum": "matmul",
    "baddbmm": "matmul", "scaled_dot_product_attention": "sdpa",
    "chunk": "split", "split": "split", "unbind": "split", "tensor_split": "split",
    "split_with_sizes": "split", "where": "mask", "masked_fill": "mask", "pad": "pad",
    "interpolate": "upsample", "exp": "elementwise", "log": "elementwise", "sqrt": "elementwise",
    "rsqrt": "elementwise", "pow": "elementwise", "abs": "elementwise", "square": "elementwise",
    "erf": "elementwise", "clamp": "elementwise", "clip": "elementwise",
    "reciprocal": "elementwise", "cos": "elementwise",
}  # fmt: skip
# removed, inputs wired to users
_PASS_NAMES = {
    "getitem", "dropout", "dropout1d", "dropout2d", "alpha_dropout", "feature_alpha_dropout",
    "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type_as",
    "type", "requires_grad", "long", "int",
}  # fmt: skip
# not ops of the graph: shape arithmetic, comparisons, masks and fresh tensors of a given shape
_NON_OPS = {
    "floordiv", "ifloordiv", "mod", "remainder", "eq", "ne", "lt", "le", "gt", "ge", "not_",
    "and_", "or_", "xor", "invert", "logical_and", "logical_or", "logical_not", "logical_xor",
    "bitwise_and", "bitwise_or", "bitwise_not", "isnan", "isinf", "isfinite", "any", "all",
    "argmax", "argmin", "nonzero", "ones_like", "zeros_like", "full_like", "empty_like",
    "rand_like", "randn_like", "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor",
    "arange", "size", "dim", "numel", "bool", "len", "floor_divide",
}  # fmt: skip
# positional index of weight / bias in functional calls of parametrised ops
_FUNCTIONAL_PARAM_ARGS = {"linear": (1, 2), "conv": (1, 2), "layernorm": (2, 3),
                          "groupnorm": (2, 3), "batchnorm": (3, 4), "rmsnorm": (2, None),
                          "embedding": (1, None)}  # fmt: skip
_VIEW_OPS = {"reshape", "permute", "split"}


def _is_rmsnorm_like(m: nn.Module) -> bool:
    """An RMSNorm written by a library (Hugging Face ``LlamaRMSNorm``, T5's ``T5LayerNorm`` is
    not matched): class name ending in ``RMSNorm``, no children, one 1-d ``weight``."""
    params = dict(m.named_parameters(recurse=False))
    return (
        type(m).__name__.lower().endswith("rmsnorm")
        and not any(True for _ in m.children())
        and set(params) == {"weight"}
        and params["weight"].dim() == 1
    )


def _hf_activation(m: nn.Module) -> str | None:
    """The op of a Hugging Face activation module (``NewGELUActivation`` -> ``gelu``)."""
    if not type(m).__module__.startswith("transformers.activations"):
        return None
    name = type(m).__name__.lower()
    for key, op in (("gelu", "gelu"), ("silu", "silu"), ("swish", "silu"), ("relu", "relu"),
                    ("tanh", "tanh"), ("sigmoid", "sigmoid"), ("mish", "silu")):  # fmt: skip
        if key in name:
            return op
    return None


def arch_is_leaf(m: nn.Module) -> bool:
    """Modules an ArchGraph records as one op (see the module docstring)."""
    return is_leaf(m) or _is_rmsnorm_like(m) or _hf_activation(m) is not None


def _module_op(mod: nn.Module) -> str:
    """The op of a module: its class (or nearest known base class) in the vocabulary."""
    if is_hf_conv1d(mod):
        return "linear"
    if _is_rmsnorm_like(mod):
        return "rmsnorm"
    act = _hf_activation(mod)
    if act is not None:
        return act
    for klass in type(mod).__mro__:
        if klass in _MODULE_OPS:
            op = _MODULE_OPS[klass]
            if op == "conv" and getattr(mod, "groups", 1) != 1:
                return "group_conv"
            return op
    return type(mod).__name__.lower()


def _op_key(n: fx.Node) -> str:
    """Name of a recorded function / method / operator, in-place ``_`` and dunders stripped."""
    name = str(n.target) if n.op == "call_method" else getattr(n.target, "__name__", "")
    name = name.strip("_") if name.startswith("__") else name
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    return name


class ArchTraceError(ValueError):
    """A module whose forward cannot be recorded as one op graph (the message names the module
    path and class): it branches on a value computed from the input, or no input was found."""


@dataclass
class ArchNode:
    """One op of an :class:`ArchGraph`.

    Attributes:
        name: the graph node name (unique).
        op: the op type (an entry of :data:`OPS`, or the lower-cased op name when unknown).
        module_path: dotted path of the module that runs the op ('' for the root).
        params: ``role -> parameter name`` (``{"weight": "0.weight", "bias": "0.bias"}``), names
            as in ``module.named_parameters()`` (the first name of a tied tensor).
        shapes: ``role -> parameter shape``.
        known: whether ``op`` is in :data:`OPS`.
        attrs: op attributes used as features (``stride``, ``channels``, ``groups``,
            ``transposed`` for Hugging Face's ``Conv1D`` with ``[in, out]`` weights, ``last``).
    """

    name: str
    op: str
    module_path: str = ""
    params: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    known: bool = True
    attrs: dict[str, Any] = field(default_factory=dict)


class ArchGraph:
    """Op-level DAG of a module: ``nodes`` (:class:`ArchNode`) and ``edge_index [2, E]``.

    Nodes are in a topological order (recording order): every edge goes from a lower to a
    higher index. ``tied`` maps the other names of a shared parameter tensor to the name the
    nodes use.
    """

    def __init__(self, nodes: list[ArchNode], edges: list[tuple[int, int]],
                 tied: dict[str, str] | None = None) -> None:  # fmt: skip
        self.nodes = nodes
        self.tied: dict[str, str] = dict(tied or {})
        uniq = sorted(set(edges))
        self.edge_index = (
            torch.tensor(uniq, dtype=torch.long).t().contiguous()
            if uniq
            else torch.zeros(2, 0, dtype=torch.long)
        )

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: nn.Module, example_input: Tensor | None = None) -> ArchGraph:
        """Record ``module``'s forward (in ``eval()`` mode, under ``no_grad``; training flags are
        restored) into an :class:`ArchGraph`.

        Args:
            module: the network.
            example_input: one input batch (image, token ids ...); guessed when ``None`` (see
                the module docstring).
        Raises:
            ArchTraceError: the forward branches on a value computed from the input (names the
                submodule path and class), or no input could be guessed.
            RuntimeError: the module's own forward failed on ``example_input``.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"ArchGraph.from_module needs an nn.Module, got {type(module).__name__}"
            )
        if _is_torch_leaf(module) and example_input is None:
            return cls._from_leaf(module)
        flags = {name: sub.training for name, sub in module.named_modules()}
        try:
            module.eval()
            if example_input is not None:
                gm = _record(module, example_input)
            else:
                gm = _record_guessed(module)
        finally:
            for name, sub in module.named_modules():
                sub.training = flags[name]
        return cls._from_recorded(gm, module)

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
    def _from_recorded(cls, gm: fx.GraphModule, root: nn.Module) -> ArchGraph:
        canon: dict[int, str] = {}
        tied: dict[str, str] = {}
        for name, p in root.named_parameters(remove_duplicate=False):
            if id(p) in canon:
                tied[name] = canon[id(p)]
            else:
                canon[id(p)] = name
        nodes: list[ArchNode] = []
        edges: list[tuple[int, int]] = []
        rep: dict[fx.Node, list[int]] = {}  # graph node -> arch nodes carrying its value
        pnames: dict[fx.Node, list[str]] = {}  # values that are (views of) parameters

        def inputs_of(n: fx.Node) -> list[int]:
            out: list[int] = []
            for a in n.all_input_nodes:
                out += rep.get(a, [])
            return sorted(set(out))

        def params_of(n: fx.Node) -> list[str]:
            out: list[str] = []
            for a in n.all_input_nodes:
                out += [p for p in pnames.get(a, []) if p not in out]
            return out

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
                obj = _get_attr(gm, str(n.target))
                if isinstance(obj, Tensor) and id(obj) in canon:
                    pnames[n] = [canon[id(obj)]]
                rep[n] = []  # parameters, buffers and constants are not ops
            elif n.op == "call_module":
                path = str(n.meta.get("metanet_path", n.target))
                mod = root.get_submodule(path) if path else root
                if isinstance(mod, _PASS_MODULES):
                    rep[n] = inputs_of(n)
                    continue
                own = {r: canon[id(p)] for r, p in mod.named_parameters()}
                shapes = {r: tuple(p.shape) for r, p in mod.named_parameters()}
                add(n, _module_op(mod), path, params=own, shapes=shapes,
                    attrs=_module_attrs(mod))  # fmt: skip
            else:  # call_function / call_method
                key = _op_key(n)
                if key == "getattr" and n.args[1] not in ("T", "mT", "H", "mH"):
                    key = "size"  # x.shape / x.dtype of a symbolic trace: not an op
                data, used = inputs_of(n), params_of(n)
                if key in _NON_OPS:
                    rep[n] = []
                    continue
                if not data:  # computed from parameters (and constants) alone: a view of them
                    rep[n] = []
                    if used:
                        pnames[n] = used
                    continue
                if key in _PASS_NAMES and not used:
                    rep[n] = data
                    continue
                op = _NAMED_OPS.get(key, key)
                own, shapes = _functional_params(n, op, pnames, root)
                extra = [p for p in used if p not in own.values()]
                if op == "mul" and len(extra) == 1 and not own:
                    shape = tuple(root.get_parameter(extra[0]).shape)
                    if len([d for d in shape if d != 1]) <= 1:
                        op = "layer_scale"
                        own, shapes, extra = {"weight": extra[0]}, {"weight": shape}, []
                for j, pname in enumerate(extra):
                    role = "bias" if op == "add" and len(extra) == 1 else f"other{j}"
                    own[role] = pname
                    shapes[role] = tuple(root.get_parameter(pname).shape)
                add(n, op, _stack_path(n), params=own, shapes=shapes)
        graph = cls(nodes, edges, tied)
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
    """A built-in torch.nn layer (not a container): a single op as the root."""
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    if isinstance(module, containers):
        return False
    return type(module).__module__.startswith("torch.nn.modules") or isinstance(
        module, tuple(_MODULE_OPS)
    )


def _get_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _functional_params(
    n: fx.Node, op: str, pnames: dict[fx.Node, list[str]], root: nn.Module
) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """``weight`` / ``bias`` of a functional call of a parametrised op (``F.linear(x, w, b)``)."""
    own: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for role, pos in zip(("weight", "bias"), _FUNCTIONAL_PARAM_ARGS.get(op, ())):
        if pos is None:
            continue
        arg = n.args[pos] if len(n.args) > pos else n.kwargs.get(role)
        if isinstance(arg, fx.Node) and len(pnames.get(arg, [])) == 1:
            own[role] = pnames[arg][0]
            shapes[role] = tuple(root.get_parameter(own[role]).shape)
    return own, shapes


def _scalar_read_error(module: nn.Module) -> Any:
    """``on_scalar`` callback of :func:`record` that raises on reads of input-derived values."""
    derived: dict[fx.Node, bool] = {}

    def from_input(node: fx.Node) -> bool:
        stack, order = [node], []
        while stack:
            u = stack.pop()
            if u in derived:
                continue
            if u.op == "placeholder":
                derived[u] = True
                continue
            pending = [a for a in u.all_input_nodes if a not in derived]
            if pending:
                stack.append(u)
                stack.extend(pending)
                continue
            derived[u] = any(derived[a] for a in u.all_input_nodes)
            order.append(u)
        return derived[node]

    def check(method: str, path: str, args: Any) -> None:
        found: list[fx.Node] = []
        fx.node.map_arg(args, lambda a: found.append(a) or a)
        if any(from_input(a) for a in found):
            sub = module.get_submodule(path) if path else module
            where = f"submodule '{path}'" if path else "the root module"
            raise ArchTraceError(
                f"forward() of {where} ({type(sub).__name__}) branches on (or reads) a value "
                f"computed from the input ({method}): its op graph would depend on the input, "
                "so there is no single ArchGraph for it"
            )

    return check


def _record(module: nn.Module, example: Tensor) -> fx.GraphModule:
    """The recorded forward of ``module`` on ``example`` with ArchGraph's leaves."""
    if not isinstance(example, Tensor):
        raise TypeError(f"example_input must be a tensor, got {type(example).__name__}")
    return record(module, example, arch_is_leaf, _scalar_read_error(module))


def _example_candidates(module: nn.Module) -> list[Tensor]:
    """Inputs to try when none is given (see the module docstring)."""
    first = next(iter(module.parameters()), None)
    dtype = first.dtype if first is not None else torch.get_default_dtype()
    device = first.device if first is not None else torch.device("cpu")
    cfg = getattr(module, "config", None)
    main = getattr(module, "main_input_name", None)
    if cfg is not None and main == "input_ids" and getattr(cfg, "vocab_size", None):
        length = min(8, int(getattr(cfg, "max_position_embeddings", None)
                            or getattr(cfg, "n_positions", None) or 8))  # fmt: skip
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, int(cfg.vocab_size), (1, length), generator=gen)
        return [ids.to(device)]
    if cfg is not None and main == "pixel_values":
        size = getattr(cfg, "image_size", 224)
        size = size if isinstance(size, int) else int(size[0])
        return [torch.randn(1, int(getattr(cfg, "num_channels", 3)), size, size, dtype=dtype,
                            device=device)]  # fmt: skip
    sizes = (32, 16, 28, 64, 8, 224)
    from metanet.graph.tracing import layer_input_shapes

    for m in module.modules():
        if isinstance(m, nn.Embedding):
            return [torch.randint(0, m.num_embeddings, (1, 8), device=device)]
        shapes = layer_input_shapes(m, sizes)
        if shapes:
            return [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    return []


class _SymbolicTracer(fx.Tracer):
    """``torch.fx`` symbolic tracer with ArchGraph's leaves (the fallback without an input)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return arch_is_leaf(m) or super().is_leaf_module(m, module_qualified_name)


def _record_guessed(module: nn.Module) -> fx.GraphModule:
    """Record ``module`` on the first guessed input it runs on; when none runs (e.g. a flatten
    whose size no guess matches), its ``torch.fx`` symbolic trace, which needs no input."""
    errors = []
    for cand in _example_candidates(module):
        try:
            return _record(module, cand)
        except (RuntimeError, IndexError, ValueError) as exc:  # a guess that does not fit
            if isinstance(exc, ArchTraceError):
                raise
            errors.append(f"{tuple(cand.shape)}: {str(exc).splitlines()[0][:120]}")
    try:
        tracer = _SymbolicTracer()
        return fx.GraphModule(module, tracer.trace(module))
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds
        tried = f"guessed inputs failed ({'; '.join(errors)})" if errors else "no input guessed"
        raise ArchTraceError(
            f"cannot record {type(module).__name__}: {tried}, and torch.fx cannot trace it "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]}); pass example_input"
        ) from None


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
    elif isinstance(mod, nn.Embedding):
        attrs["channels"] = int(mod.embedding_dim)
    elif is_hf_conv1d(mod):
        attrs["channels"] = int(mod.weight.shape[1])
        attrs["transposed"] = True
    elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        attrs["channels"] = int(mod.num_features)
    elif isinstance(mod, nn.GroupNorm):
        attrs["channels"] = int(mod.num_channels)
    elif _is_rmsnorm_like(mod):
        attrs["channels"] = int(mod.weight.shape[0])
    elif isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d)):
        s = mod.stride if mod.stride is not None else mod.kernel_size
        attrs["stride"] = int(s if isinstance(s, int) else s[0])
    return attrs


def _main_shape(n: ArchNode) -> tuple[int, ...] | None:
    """Shape of the op's main parameter, ``[out, in, *kernel]`` (``Conv1D``'s swapped)."""
    for role in ("weight", "in_proj_weight"):
        if role in n.shapes:
            shape = n.shapes[role]
            if n.attrs.get("transposed") and len(shape) == 2:
                return (shape[1], shape[0])
            return shape
    if not n.shapes:
        return None
    # a parameter of a tensor op (layer scale [C, 1, 1], position embedding [1, T, D]): its
    # axes of size > 1, read as [out, in]
    return tuple(d for d in next(iter(n.shapes.values())) if d != 1)[:2] or None
