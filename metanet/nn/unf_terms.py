"""The equivariant terms of universal neural functionals (Zhou et al. 2024), apart from the layers.

A *permutation spec* (:class:`PermSpec`) names every tensor of a weight space and, per axis, the
symbol of the permutation acting on it (``None``: the axis is never permuted, e.g. input pixels,
output classes, conv kernel positions). For each pair (input tensor ``X``, output tensor ``Y``)
the linear maps commuting with the group are spanned by the *valid partitions* of the axes of
``Y`` and ``X`` together (:func:`valid_partitions`), where a block may only join axes carrying the
same symbol. :func:`enumerate_terms` reads each partition as an einsum: input axes in one block
are read on their diagonal, input blocks without an output axis are pooled, output axes in a
block with input axes take that index (several output axes in one block: written on the
diagonal) and output blocks without input are broadcast. :func:`apply_plan` and
:func:`embed_output` carry a term out on tensors; :func:`fold` / :func:`unfold` move the
unpermuted axes into the channels, where a dense map over them is exactly equivariant.

This module is pure tensor bookkeeping (no parameters); the layers that use it are in
:mod:`metanet.nn.unf`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from metanet.weightspace import WeightSpaceSpec

__all__ = [
    "InputPlan",
    "OutStructure",
    "PermSpec",
    "Symbol",
    "apply_plan",
    "embed_output",
    "enumerate_terms",
    "fold",
    "perm_spec_of",
    "reduce_axes",
    "unfold",
    "valid_partitions",
]

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
    ) -> list[torch.Tensor]:
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
class InputPlan:
    """How to turn a folded input into ``[B, CF, *fed blocks]``: diagonals, pooling, order."""

    tensor: int
    blocks: tuple[tuple[int, ...], ...]  # input-axis blocks (positions among permuted axes)
    target: tuple[int | None, ...]  # per block: index of the output block it feeds, or None


@dataclass(frozen=True)
class OutStructure:
    """Output blocks (positions among the output's permuted axes) and which are fed by input."""

    blocks: tuple[tuple[int, ...], ...]
    fed: tuple[bool, ...]


def enumerate_terms(
    out_syms: Sequence[Symbol], in_syms: Sequence[Symbol], tensor: int
) -> list[tuple[OutStructure, InputPlan]]:
    """The basis of equivariant linear maps from input tensor ``tensor`` (axis symbols
    ``in_syms``) to an output with axis symbols ``out_syms``: one ``(output structure, input
    plan)`` per valid partition of the output and input axes together."""
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
        structure = OutStructure(
            tuple(o for o, _ in out_blocks), tuple(bool(i) for _, i in out_blocks)
        )
        plan_blocks = [(i, n) for n, (_, i) in enumerate(out_blocks) if i] + in_blocks
        # targets as ranks among the fed blocks: the pooled tensor depends on the relative order
        # of the kept blocks only, so equal plans of different outputs share one cache entry
        ranks = {n: r for r, n in enumerate(sorted(n for _, n in plan_blocks if n is not None))}
        plan = InputPlan(
            tensor,
            tuple(b for b, _ in plan_blocks),
            tuple(None if n is None else ranks[n] for _, n in plan_blocks),
        )
        terms.append((structure, plan))
    return terms


def reduce_axes(x: torch.Tensor, dims: list[int], how: str) -> torch.Tensor:
    """Pool ``x`` over ``dims`` by ``how`` (``"mean"``, ``"sum"`` or ``"max"``; no dims: ``x``)."""
    if not dims:
        return x
    if how == "mean":
        return x.mean(dim=dims)
    if how == "sum":
        return x.sum(dim=dims)
    if how == "max":
        return x.amax(dim=dims)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'max', got {how!r}")


def apply_plan(x: torch.Tensor, plan: InputPlan, how: str) -> torch.Tensor:
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
    x = reduce_axes(x, pooled, how)
    labels = [l for l in labels if plan.target[l] is not None]
    order = sorted(range(len(labels)), key=lambda i: plan.target[labels[i]])
    if order != list(range(len(labels))):
        x = x.permute([0] + [1 + i for i in order] + [x.dim() - 1])
    return x


def embed_output(y: torch.Tensor, st: OutStructure, sizes: Sequence[int]) -> torch.Tensor:
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
