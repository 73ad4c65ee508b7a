"""Universal neural functionals (Zhou et al. 2024): equivariant layers made from a permutation spec.

A *permutation spec* names every tensor of a weight space and, per axis, the symbol of the
permutation acting on it (``None``: the axis is never permuted, e.g. input pixels, output classes,
conv kernel positions). Example, a one-layer RNN cell with a readout::

    {"weight_ih": ("h", None), "weight_hh": ("h", "h"), "bias": ("h",),
     "fc.weight": (None, "h"), "fc.bias": (None,)}

For each pair (input tensor ``X``, output tensor ``Y``) the linear maps commuting with the group are
spanned by the *valid partitions* of the axes of ``Y`` and ``X`` together, where a block may only
join axes carrying the same symbol. A partition is read as an einsum: input axes in one block are
read on their diagonal, input blocks without an output axis are pooled (mean by default), output
axes in a block with input axes take that index (several output axes in one block: written on the
diagonal) and output blocks without input are broadcast. Unpermuted axes carry no symmetry, so
they are folded into the channels (a dense map over them is exactly equivariant): a conv kernel,
the pixel axis of a first layer, the class axis of a last layer.

:class:`UNFLayer` enumerates those terms once at construction. Terms whose outputs have the same
output structure (which output axes are indexed, broadcast or diagonal) are concatenated along
channels and mixed with one matmul, and pooled inputs are computed once per forward and shared by
all outputs — the same work a hand-written NFN layer does.

:class:`PermSpec` holds the symbols plus the tensor shapes (shapes of unpermuted axes size the
parameters); :meth:`PermSpec.from_weightspace_spec` converts a
:class:`~metanet.weightspace.WeightSpaceSpec` (tensors ``w0, b0, w1, b1, ...``, weights in neuron
view ``[out, in, *extra]``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from metanet.nn.layers import (
    ChannelDropout,
    GaussianFourierFeatures,
    Pointwise,
    TensorList,
    WSFeatures,
    check_weightspace,
    mlp_head,
)
from metanet.weightspace import WeightSpace, WeightSpaceSpec

Symbol = Hashable


# ------------------------------------------------------------------------------------------
# permutation specs
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PermSpec:
    """Names, axis shapes and per-axis permutation symbols of a collection of tensors.

    Attributes:
        names: tensor names, in the order models read and return them.
        shapes: per tensor, the shape without batch and channel dims.
        symbols: per tensor, one symbol per axis (``None`` = unpermuted).
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    symbols: tuple[tuple[Symbol | None, ...], ...]

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("a permutation spec needs at least one tensor")
        if not (len(self.names) == len(self.shapes) == len(self.symbols)):
            raise ValueError("names, shapes and symbols must have one entry per tensor")
        sizes: dict[Symbol, int] = {}
        for name, shape, syms in zip(self.names, self.shapes, self.symbols):
            if len(shape) != len(syms):
                raise ValueError(
                    f"tensor '{name}' has {len(shape)} axes but {len(syms)} permutation symbols"
                )
            for n, s in zip(shape, syms):
                if s is not None and sizes.setdefault(s, n) != n:
                    raise ValueError(
                        f"permutation '{s}' acts on axes of size {sizes[s]} and {n} "
                        f"(tensor '{name}')"
                    )

    @classmethod
    def from_dict(
        cls, symbols: Mapping[str, Sequence[Symbol | None]], shapes: Mapping[str, Sequence[int]]
    ) -> PermSpec:
        """From ``{name: symbols per axis}`` and ``{name: shape}`` (same keys, dict order kept)."""
        missing = set(symbols) ^ set(shapes)
        if missing:
            raise ValueError(f"symbols and shapes name different tensors: {sorted(missing)}")
        names = tuple(symbols)
        return cls(
            names,
            tuple(tuple(int(n) for n in shapes[k]) for k in names),
            tuple(tuple(symbols[k]) for k in names),
        )

    @classmethod
    def from_weightspace_spec(cls, spec: WeightSpaceSpec, io_symbols: bool = False) -> PermSpec:
        """Tensors ``w0, b0, w1, b1, ...`` of a weight space, weights in neuron view.

        Hidden axes get symbol ``p`` (the spec's permutation id); kernel and ``in_repeat`` axes are
        unpermuted. Unpermuted neuron axes (input/output neurons) stay ``None``, or with
        ``io_symbols=True`` get their own symbols (NFN's NP group, in which input and output
        neurons are permutable too; the input symbol is shared by every layer reading the
        network's input).
        """
        names, shapes, symbols = [], [], []
        for i, layer in enumerate(spec.layers):
            out_s: Symbol | None = layer.out_perm
            in_s: Symbol | None = layer.in_perm
            if io_symbols:
                out_s = ("io_out", i) if out_s is None else out_s
                in_s = "io_in" if in_s is None else in_s
            extra = layer.kernel_shape if layer.in_repeat == 1 else (layer.in_repeat,)
            names += [layer.weight_key, layer.bias_key]
            shapes += [(layer.out_features, layer.in_features, *extra), (layer.out_features,)]
            symbols += [(out_s, in_s, *([None] * len(extra))), (out_s,)]
        return cls(tuple(names), tuple(shapes), tuple(symbols))

    @property
    def symbol_sizes(self) -> dict[Symbol, int]:
        out: dict[Symbol, int] = {}
        for shape, syms in zip(self.shapes, self.symbols):
            for n, s in zip(shape, syms):
                if s is not None:
                    out[s] = n
        return out

    def fold_factor(self, t: int) -> int:
        """How many channels one feature channel of tensor ``t`` becomes after folding."""
        return math.prod(n for n, s in zip(self.shapes[t], self.symbols[t]) if s is None)

    def perm_axes(self, t: int) -> list[int]:
        return [a for a, s in enumerate(self.symbols[t]) if s is not None]

    def free_axes(self, t: int) -> list[int]:
        return [a for a, s in enumerate(self.symbols[t]) if s is None]

    def random_permutation(
        self, generator: torch.Generator | None = None
    ) -> dict[Symbol, torch.Tensor]:
        """One random permutation ``[n]`` per symbol."""
        return {s: torch.randperm(n, generator=generator) for s, n in self.symbol_sizes.items()}

    def permute(
        self, tensors: Sequence[torch.Tensor], perms: Mapping[Symbol, torch.Tensor], lead: int = 1
    ) -> TensorList:
        """Apply ``perms`` to tensors laid out ``[*lead, *shape]`` (``lead=2`` for features)."""
        out = []
        for x, syms in zip(tensors, self.symbols):
            for a, s in enumerate(syms):
                if s is not None:
                    x = x.index_select(lead + a, perms[s].to(x.device))
            out.append(x)
        return out


def perm_spec_of(spec: WeightSpaceSpec | PermSpec, io_symbols: bool = False) -> PermSpec:
    """A :class:`PermSpec` given either one or a :class:`WeightSpaceSpec`."""
    if isinstance(spec, PermSpec):
        return spec
    if isinstance(spec, WeightSpaceSpec):
        return PermSpec.from_weightspace_spec(spec, io_symbols=io_symbols)
    raise TypeError(f"expected a WeightSpaceSpec or PermSpec, got {type(spec).__name__}")


# ------------------------------------------------------------------------------------------
# folding unpermuted axes into channels
# ------------------------------------------------------------------------------------------
def fold(x: torch.Tensor, pspec: PermSpec, t: int) -> torch.Tensor:
    """``[B, C, *shape] -> [B, *permuted axes, C * fold_factor]``: channels last, with the
    unpermuted axes folded into them (a contiguous tensor)."""
    free, perm = pspec.free_axes(t), pspec.perm_axes(t)
    order = [0] + [2 + a for a in perm] + [1] + [2 + a for a in free]
    y = x.permute(order)
    return y.reshape(*y.shape[: 1 + len(perm)], -1)


def unfold(y: torch.Tensor, pspec: PermSpec, t: int) -> torch.Tensor:
    """Inverse of :func:`fold`: ``[B, *permuted axes, C * F] -> [B, C, *shape]`` (a view)."""
    free, perm = pspec.free_axes(t), pspec.perm_axes(t)
    shape = pspec.shapes[t]
    y = y.reshape(*y.shape[:-1], -1, *[shape[a] for a in free])
    # y dims: 0 = batch, 1..k = permuted axes, k+1 = channels, then free axes
    k = len(perm)
    where = {a: 1 + i for i, a in enumerate(perm)} | {a: k + 2 + i for i, a in enumerate(free)}
    return y.permute([0, k + 1] + [where[a] for a in range(len(shape))])


# ------------------------------------------------------------------------------------------
# basis enumeration
# ------------------------------------------------------------------------------------------
def _set_partitions(items: list[int]) -> Iterator[list[list[int]]]:
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for sub in _set_partitions(rest):
        for i in range(len(sub)):
            yield sub[:i] + [[first] + sub[i]] + sub[i + 1 :]
        yield [[first]] + sub


def valid_partitions(symbols: Sequence[Symbol]) -> Iterator[list[list[int]]]:
    """Partitions of positions ``0..len-1`` whose blocks only join equal symbols."""
    groups: dict[Symbol, list[int]] = {}
    for i, s in enumerate(symbols):
        groups.setdefault(s, []).append(i)
    for combo in itertools.product(*[list(_set_partitions(g)) for g in groups.values()]):
        yield [block for part in combo for block in part]


@dataclass(frozen=True)
class _InputPlan:
    """How to turn a folded input into ``[B, CF, *fed blocks]``: diagonals, pooling, order."""

    tensor: int
    blocks: tuple[tuple[int, ...], ...]  # input-axis blocks (positions among permuted axes)
    target: tuple[int | None, ...]  # per block: index of the output block it feeds, or None


@dataclass(frozen=True)
class _OutStructure:
    """Output blocks (positions among the output's permuted axes) and which are fed by input."""

    blocks: tuple[tuple[int, ...], ...]
    fed: tuple[bool, ...]


def _enumerate_terms(
    out_syms: Sequence[Symbol], in_syms: Sequence[Symbol], tensor: int
) -> list[tuple[_OutStructure, _InputPlan]]:
    k1 = len(out_syms)
    terms = []
    for partition in valid_partitions(list(out_syms) + list(in_syms)):
        out_blocks, in_blocks = [], []
        for block in partition:
            o = tuple(sorted(a for a in block if a < k1))
            i = tuple(sorted(a - k1 for a in block if a >= k1))
            if o:
                out_blocks.append((o, i))
            else:
                in_blocks.append((i, None))
        out_blocks.sort(key=lambda b: b[0][0])
        structure = _OutStructure(
            tuple(o for o, _ in out_blocks), tuple(bool(i) for _, i in out_blocks)
        )
        plan_blocks = [(i, n) for n, (_, i) in enumerate(out_blocks) if i] + in_blocks
        # targets as ranks among the fed blocks: the pooled tensor depends on the relative order
        # of the kept blocks only, so equal plans of different outputs share one cache entry
        ranks = {n: r for r, n in enumerate(sorted(n for _, n in plan_blocks if n is not None))}
        plan = _InputPlan(
            tensor,
            tuple(b for b, _ in plan_blocks),
            tuple(None if n is None else ranks[n] for _, n in plan_blocks),
        )
        terms.append((structure, plan))
    return terms


def _reduce(x: torch.Tensor, dims: list[int], how: str) -> torch.Tensor:
    if not dims:
        return x
    if how == "mean":
        return x.mean(dim=dims)
    if how == "sum":
        return x.sum(dim=dims)
    if how == "max":
        return x.amax(dim=dims)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'max', got {how!r}")


def _apply_plan(x: torch.Tensor, plan: _InputPlan, how: str) -> torch.Tensor:
    """Folded input ``[B, *perm axes, CF]`` -> ``[B, *fed blocks in output block order, CF]``."""
    labels: list[int] = [-1] * (x.dim() - 2)
    for b, block in enumerate(plan.blocks):
        for a in block:
            labels[a] = b
    # diagonals for blocks joining several input axes (torch puts the diagonal last: move it
    # in front of the channels)
    for b in range(len(plan.blocks)):
        while labels.count(b) > 1:
            d1, d2 = [1 + i for i, l in enumerate(labels) if l == b][:2]
            x = torch.diagonal(x, dim1=d1, dim2=d2).movedim(-1, -2)
            labels = [l for i, l in enumerate(labels) if i + 1 not in (d1, d2)] + [b]
    pooled = [1 + i for i, l in enumerate(labels) if plan.target[l] is None]
    x = _reduce(x, pooled, how)
    labels = [l for l in labels if plan.target[l] is not None]
    order = sorted(range(len(labels)), key=lambda i: plan.target[labels[i]])
    if order != list(range(len(labels))):
        x = x.permute([0] + [1 + i for i in order] + [x.dim() - 1])
    return x


def _embed(y: torch.Tensor, st: _OutStructure, sizes: Sequence[int]) -> torch.Tensor:
    """``[B, *fed blocks, M]`` -> ``[B, *output perm axes, M]`` (size 1 on broadcast axes)."""
    k = len(sizes)
    if all(len(b) == 1 for b in st.blocks):
        shape = [1] * k
        for block, fed in zip(st.blocks, st.fed):
            if fed:
                shape[block[0]] = sizes[block[0]]
        return y.reshape(y.shape[0], *shape, y.shape[-1])
    letters = "ijklmnopqrstuvwxy"
    y_idx, operands, out_idx, squeeze = [], [], [""] * k, []
    for n, (block, fed) in enumerate(zip(st.blocks, st.fed)):
        c = letters[n]
        if fed:
            y_idx.append(c)
        if len(block) == 1:
            if fed:
                out_idx[block[0]] = c
            else:
                squeeze.append(block[0])
            continue
        m, size = len(block), sizes[block[0]]
        delta = torch.zeros([size] * m, dtype=y.dtype, device=y.device)
        ar = torch.arange(size, device=y.device)
        delta[(ar,) * m] = 1
        subs = [c] + [letters[len(st.blocks) + 2 * n + j] for j in range(m - 1)]
        for a, sub in zip(block, subs):
            out_idx[a] = sub
        operands.append((delta, "".join(subs)))
    expr = "a" + "".join(y_idx) + "z" + "".join("," + sub for _, sub in operands)
    expr += "->a" + "".join(sub for sub in out_idx if sub) + "z"
    out = torch.einsum(expr, y, *[d for d, _ in operands])
    for a in sorted(squeeze):
        out = out.unsqueeze(1 + a)
    return out


# ------------------------------------------------------------------------------------------
# the layer
# ------------------------------------------------------------------------------------------
class UNFLayer(nn.Module):
    """Linear layer equivariant to the permutations of a :class:`PermSpec` (or a weight space).

    Args:
        spec: a :class:`PermSpec`, or a :class:`WeightSpaceSpec` (converted with ``io_symbols``).
        in_channels, out_channels: feature channels per weight before/after.
        reduction: how pooled axes are aggregated: ``"mean"`` (default), ``"sum"`` or ``"max"``
            (``"max"`` keeps equivariance but is no longer linear).
        io_symbols: for a WeightSpaceSpec, treat input/output neurons as permutable (NP).
        init_scale: multiplies the default init (``U(+-1/sqrt(fan_in))`` over all terms).

    Input and output: a list of tensors ``[B, C, *shape]`` in the spec's order, or a
    :class:`WSFeatures` (then a :class:`WSFeatures` comes back).
    """

    def __init__(
        self,
        spec: PermSpec | WeightSpaceSpec,
        in_channels: int,
        out_channels: int,
        reduction: str = "mean",
        io_symbols: bool = False,
        init_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "max"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'max', got {reduction!r}")
        self.ws_spec = spec if isinstance(spec, WeightSpaceSpec) else None
        self.pspec = perm_spec_of(spec, io_symbols)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.reduction = reduction
        ps = self.pspec
        # per output tensor: list of (structure, [input plans]) groups
        self.groups: list[list[tuple[_OutStructure, list[_InputPlan]]]] = []  # per output
        self.weights = nn.ParameterList()  # one [M_o, K_g] matrix per (output, group), flat
        self.biases = nn.ParameterList()
        self._first: list[int] = []  # index of each output's first group matrix in self.weights
        for o in range(len(ps.names)):
            out_syms = [ps.symbols[o][a] for a in ps.perm_axes(o)]
            by_structure: dict[_OutStructure, list[_InputPlan]] = {}
            for t in range(len(ps.names)):
                in_syms = [ps.symbols[t][a] for a in ps.perm_axes(t)]
                for st, plan in _enumerate_terms(out_syms, in_syms, t):
                    by_structure.setdefault(st, []).append(plan)
            groups = list(by_structure.items())
            self.groups.append(groups)
            fan_ins = [
                sum(in_channels * ps.fold_factor(p.tensor) for p in plans) for _, plans in groups
            ]
            m = out_channels * ps.fold_factor(o)
            bound = init_scale / math.sqrt(sum(fan_ins))
            self._first.append(len(self.weights))
            for k in fan_ins:
                self.weights.append(nn.Parameter(torch.empty(m, k).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.zeros(m)))

    @property
    def num_terms(self) -> int:
        """Number of basis terms (channel blocks) of the layer, over all tensor pairs."""
        return sum(len(plans) for groups in self.groups for _, plans in groups)

    def extra_repr(self) -> str:
        return (
            f"tensors={len(self.pspec.names)}, in_channels={self.in_channels}, "
            f"out_channels={self.out_channels}, terms={self.num_terms}, reduction={self.reduction}"
        )

    def forward(self, x: WSFeatures | Sequence[torch.Tensor]) -> WSFeatures | TensorList:
        tensors = x.tensors() if isinstance(x, WSFeatures) else list(x)
        ps = self.pspec
        if len(tensors) != len(ps.names):
            raise ValueError(
                f"{type(self).__name__} expects {len(ps.names)} tensors, got {len(tensors)}"
            )
        folded = []
        for t, v in enumerate(tensors):
            if v.shape[1:] != (self.in_channels, *ps.shapes[t]):
                raise ValueError(
                    f"tensor '{ps.names[t]}' should be [B, {self.in_channels}, *shape] with "
                    f"shape {ps.shapes[t]}, got {tuple(v.shape)}"
                )
            folded.append(fold(v, ps, t))
        cache: dict[_InputPlan, torch.Tensor] = {}
        batch = folded[0].shape[0]
        outs = []
        for o, groups in enumerate(self.groups):
            out_sizes = [ps.shapes[o][a] for a in ps.perm_axes(o)]
            acc = self.biases[o].view(*([1] * (1 + len(out_sizes))), -1)
            for g, (st, plans) in enumerate(groups):
                parts = []
                for plan in plans:
                    if plan not in cache:
                        cache[plan] = _apply_plan(folded[plan.tensor], plan, self.reduction)
                    parts.append(cache[plan])
                y = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
                # channel mixing: one GEMM over all positions (channels are last)
                y = nn.functional.linear(y, self.weights[self._first[o] + g])
                acc = acc + _embed(y, st, out_sizes)
            if acc.shape[0] != batch or list(acc.shape[1:-1]) != out_sizes:
                acc = acc.expand(batch, *out_sizes, -1)
            outs.append(unfold(acc, ps, o))
        if isinstance(x, WSFeatures):
            return WSFeatures.from_tensors(x.spec, outs)
        return outs


class InvariantPool(nn.Module):
    """Invariant pooling: per tensor, pool over every permuted axis and keep the unpermuted ones.

    ``[B, C, *shape]`` per tensor -> ``[B, sum_t C * fold_factor(t)]``. With a WeightSpaceSpec and
    ``io_symbols=False`` this keeps the input-neuron axis of the first layer and the output-neuron
    axis of the last (NFN's HNP pooling; DWS's invariant layer); with ``io_symbols=True`` every
    neuron axis is pooled (NP pooling).
    """

    def __init__(
        self, spec: PermSpec | WeightSpaceSpec, channels: int, reduction: str = "mean",
        io_symbols: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.pspec = perm_spec_of(spec, io_symbols)
        self.channels, self.reduction = channels, reduction
        if reduction not in ("mean", "sum", "max"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'max', got {reduction!r}")

    @property
    def out_dim(self) -> int:
        return sum(self.channels * self.pspec.fold_factor(t) for t in range(len(self.pspec.names)))

    def forward(self, x: WSFeatures | Sequence[torch.Tensor]) -> torch.Tensor:
        tensors = x.tensors() if isinstance(x, WSFeatures) else list(x)
        pooled = []
        for t, v in enumerate(tensors):
            f = fold(v, self.pspec, t)
            pooled.append(_reduce(f, list(range(1, f.dim() - 1)), self.reduction))
        return torch.cat(pooled, 1)


def tensors_of(
    x: WeightSpace | Mapping[str, torch.Tensor] | Sequence[torch.Tensor], pspec: PermSpec
) -> TensorList:
    """One-channel feature tensors ``[B, 1, *shape]`` in ``pspec`` order from a model input.

    Accepts a :class:`WeightSpace` (neuron view), a mapping ``{name: [B, *shape]}`` or a list of
    ``[B, *shape]`` tensors in spec order.
    """
    if isinstance(x, WeightSpace):
        out = []
        for i in range(x.spec.num_layers):
            out += [x.neuron_view(i).unsqueeze(1), x.biases[i].unsqueeze(1)]
    elif isinstance(x, Mapping):
        missing = [k for k in pspec.names if k not in x]
        if missing:
            raise KeyError(f"input lacks tensors {missing}")
        out = [x[k].unsqueeze(1) for k in pspec.names]
    else:
        out = [v.unsqueeze(1) for v in x]
    if len(out) != len(pspec.names):
        raise ValueError(f"expected {len(pspec.names)} tensors, got {len(out)}")
    for name, shape, v in zip(pspec.names, pspec.shapes, out):
        if tuple(v.shape[2:]) != tuple(shape):
            raise ValueError(f"tensor '{name}' has shape {tuple(v.shape[2:])}, expected {shape}")
        if not torch.isfinite(v).all():
            raise ValueError(f"tensor '{name}' contains NaN or inf values")
    return out


class _Stack(nn.Module):
    """A sequence of layers acting on feature lists (UNF models)."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, xs: TensorList) -> TensorList:
        for layer in self.layers:
            xs = layer(xs)
        return xs


def _equivariant_stack(
    make, in_channels: int, hidden: int, depth: int, out_channels: int | None, dropout: float,
) -> tuple[_Stack, int]:  # fmt: skip
    mods: list[nn.Module] = []
    c = in_channels
    for d in range(depth):
        last = d == depth - 1 and out_channels is not None
        c_out = out_channels if last else hidden
        mods.append(make(c, c_out))
        if not last:
            mods.append(Pointwise(nn.ReLU()))
            if dropout > 0:
                mods.append(ChannelDropout(dropout))
        c = c_out
    return _Stack(mods), c


class UNF(nn.Module):
    """Invariant UNF: ``depth`` UNF layers (ReLU), invariant pooling, MLP head -> ``[B, out_dim]``.

    Args:
        spec: a WeightSpaceSpec (input/output neurons unpermuted, exact hidden-permutation
            symmetry, including specs that share a permutation between layers, e.g. a residual
            MLP) or a general :class:`PermSpec` (e.g. an RNN cell).
        out_dim: output size.
        hidden: channels of the equivariant layers.
        depth: number of equivariant layers.
        head_hidden: width of the 2-layer MLP head.
        reduction: pooling inside layers and readout (``"mean"``, ``"sum"``, ``"max"``).
        dropout: channel dropout between layers and in the head.
        fourier_features: if > 0, random Fourier features of the weight values with this many
            frequencies before the first layer (elementwise, so equivariance is kept; what INR
            classification needs, see :class:`~metanet.nn.layers.GaussianFourierFeatures`).
        fourier_scale: std of those frequencies.

    ``forward`` takes a :class:`WeightSpace` (for a WeightSpaceSpec), or a mapping
    ``{name: [B, *shape]}`` / list in spec order (for a PermSpec).
    """

    input_kind = "weightspace"

    def __init__(
        self,
        spec: WeightSpaceSpec | PermSpec,
        out_dim: int = 1,
        hidden: int = 32,
        depth: int = 3,
        head_hidden: int = 256,
        reduction: str = "mean",
        dropout: float = 0.0,
        fourier_features: int = 0,
        fourier_scale: float = 10.0,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.pspec = perm_spec_of(spec)
        self.out_dim = out_dim
        self.encode = None
        c_in = 1
        if fourier_features:
            self.encode = GaussianFourierFeatures(1, fourier_features, fourier_scale)
            c_in = self.encode.out_channels
        self.body, c = _equivariant_stack(
            lambda i, o: UNFLayer(self.pspec, i, o, reduction=reduction), c_in, hidden, depth,
            None, dropout,
        )  # fmt: skip
        self.pool = InvariantPool(self.pspec, c, reduction=reduction)
        self.head = mlp_head(self.pool.out_dim, head_hidden, out_dim, dropout=dropout)

    def forward(
        self, x: WeightSpace | Mapping[str, torch.Tensor] | Sequence[torch.Tensor]
    ) -> torch.Tensor:
        if isinstance(x, WeightSpace) and isinstance(self.spec, WeightSpaceSpec):
            check_weightspace(x, self.spec, type(self).__name__)
        xs = tensors_of(x, self.pspec)
        if self.encode is not None:
            xs = self.encode(xs)
        return self.head(self.pool(self.body(xs)))


class UNFEquivariant(nn.Module):
    """Equivariant UNF: weights in, new weights of the same spec out (editing, generation).

    The output is ``x + scale * f(x)`` with ``f`` a stack of UNF layers ending in one channel
    (``residual=True``), or ``f(x)``. Returns a :class:`WeightSpace` for a WeightSpace input,
    otherwise a list of ``[B, *shape]`` tensors in spec order.
    """

    input_kind = "weightspace"

    def __init__(
        self,
        spec: WeightSpaceSpec | PermSpec,
        hidden: int = 32,
        depth: int = 3,
        reduction: str = "mean",
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.pspec = perm_spec_of(spec)
        self.residual = residual
        self.body, _ = _equivariant_stack(
            lambda i, o: UNFLayer(self.pspec, i, o, reduction=reduction), 1, hidden, depth, 1, 0.0
        )
        self.scale = nn.Parameter(torch.tensor(1e-3 if residual else 1.0))

    def forward(self, x: WeightSpace | Mapping[str, torch.Tensor] | Sequence[torch.Tensor]):
        if isinstance(x, WeightSpace) and isinstance(self.spec, WeightSpaceSpec):
            check_weightspace(x, self.spec, type(self).__name__)
        xs = tensors_of(x, self.pspec)
        ys = self.body(xs)
        out = [(v + self.scale * y) if self.residual else y for v, y in zip(xs, ys)]
        out = [v.squeeze(1) for v in out]
        if isinstance(x, WeightSpace):
            return WSFeatures.from_tensors(x.spec, [v.unsqueeze(1) for v in out]).to_weightspace()
        return out


__all__ = [
    "InvariantPool",
    "PermSpec",
    "UNF",
    "UNFEquivariant",
    "UNFLayer",
    "fold",
    "perm_spec_of",
    "tensors_of",
    "unfold",
    "valid_partitions",
]
