"""Universal neural functionals (Zhou et al. 2024): equivariant layers made from a permutation spec.

A *permutation spec* names every tensor of a weight space and, per axis, the symbol of the
permutation acting on it (``None``: the axis is never permuted, e.g. input pixels, output classes,
conv kernel positions). Example, a one-layer RNN cell with a readout::

    {"weight_ih": ("h", None), "weight_hh": ("h", "h"), "bias": ("h",),
     "fc.weight": (None, "h"), "fc.bias": (None,)}

For each pair (input tensor ``X``, output tensor ``Y``) the linear maps commuting with the group are
spanned by the *valid partitions* of the axes of ``Y`` and ``X`` together; their enumeration, the
einsum each one stands for and the folding of unpermuted axes into channels are in
:mod:`metanet.nn.unf_terms`. Pooling is mean by default.

:class:`UNFLayer` enumerates those terms once at construction. Terms whose outputs have the same
output structure (which output axes are indexed, broadcast or diagonal) are concatenated along
channels and mixed with one matmul, and pooled inputs are computed once per forward and shared by
all outputs — the same work a hand-written NFN layer does.

:class:`~metanet.nn.unf_terms.PermSpec` holds the symbols plus the tensor shapes (shapes of
unpermuted axes size the parameters); ``PermSpec.from_weightspace_spec`` converts a
:class:`~metanet.weightspace.WeightSpaceSpec` (tensors ``w0, b0, w1, b1, ...``, weights in neuron
view ``[out, in, *extra]``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from metanet.nn.base import WeightSpaceModel, value_encoding
from metanet.nn.layers import ChannelDropout, Pointwise, TensorList, WSFeatures
from metanet.nn.unf_terms import (
    InputPlan,
    OutStructure,
    PermSpec,
    apply_plan,
    embed_output,
    enumerate_terms,
    fold,
    perm_spec_of,
    reduce_axes,
    unfold,
)
from metanet.weightspace import WeightSpace, WeightSpaceSpec


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
        self.groups: list[list[tuple[OutStructure, list[InputPlan]]]] = []  # per output
        self.weights = nn.ParameterList()  # one [M_o, K_g] matrix per (output, group), flat
        self.biases = nn.ParameterList()
        self._first: list[int] = []  # index of each output's first group matrix in self.weights
        for o in range(len(ps.names)):
            out_syms = [ps.symbols[o][a] for a in ps.perm_axes(o)]
            by_structure: dict[OutStructure, list[InputPlan]] = {}
            for t in range(len(ps.names)):
                in_syms = [ps.symbols[t][a] for a in ps.perm_axes(t)]
                for st, plan in enumerate_terms(out_syms, in_syms, t):
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
        cache: dict[InputPlan, torch.Tensor] = {}
        batch = folded[0].shape[0]
        outs = []
        for o, groups in enumerate(self.groups):
            out_sizes = [ps.shapes[o][a] for a in ps.perm_axes(o)]
            acc = self.biases[o].view(*([1] * (1 + len(out_sizes))), -1)
            for g, (st, plans) in enumerate(groups):
                parts = []
                for plan in plans:
                    if plan not in cache:
                        cache[plan] = apply_plan(folded[plan.tensor], plan, self.reduction)
                    parts.append(cache[plan])
                y = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
                # channel mixing: one GEMM over all positions (channels are last)
                y = nn.functional.linear(y, self.weights[self._first[o] + g])
                acc = acc + embed_output(y, st, out_sizes)
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
            pooled.append(reduce_axes(f, list(range(1, f.dim() - 1)), self.reduction))
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
    make, in_channels: int, hidden: int, num_layers: int, out_channels: int | None, dropout: float,
) -> tuple[_Stack, int]:  # fmt: skip
    mods: list[nn.Module] = []
    c = in_channels
    for d in range(num_layers):
        last = d == num_layers - 1 and out_channels is not None
        c_out = out_channels if last else hidden
        mods.append(make(c, c_out))
        if not last:
            mods.append(Pointwise(nn.ReLU()))
            if dropout > 0:
                mods.append(ChannelDropout(dropout))
        c = c_out
    return _Stack(mods), c


class UNF(WeightSpaceModel):
    """Invariant UNF: ``num_layers`` UNF layers (ReLU), invariant pooling, MLP head ->
    ``[B, out_dim]``.

    Args:
        spec: a WeightSpaceSpec (input/output neurons unpermuted, exact hidden-permutation
            symmetry, including specs that share a permutation between layers, e.g. a residual
            MLP) or a general :class:`PermSpec` (e.g. an RNN cell).
        out_dim: output size.
        hidden: channels of the equivariant layers.
        num_layers: number of equivariant layers.
        head_hidden: width of the 2-layer MLP head.
        reduction: pooling inside layers and readout (``"mean"``, ``"sum"``, ``"max"``).
        dropout: channel dropout between layers and in the head.
        fourier_features: if > 0, random Fourier features of the weight values with this many
            frequencies before the first layer (elementwise, so equivariance is kept; what INR
            classification needs, see :class:`~metanet.nn.layers.FourierFeatures`).
        fourier_sigma: std of those frequencies.

    ``forward`` takes a :class:`WeightSpace` (for a WeightSpaceSpec), or a mapping
    ``{name: [B, *shape]}`` / list in spec order (for a PermSpec).
    """

    spec_types = (WeightSpaceSpec, PermSpec)

    def __init__(
        self,
        spec: WeightSpaceSpec | PermSpec,
        out_dim: int = 1,
        hidden: int = 32,
        num_layers: int = 3,
        head_hidden: int = 256,
        reduction: str = "mean",
        dropout: float = 0.0,
        fourier_features: int = 0,
        fourier_sigma: float = 10.0,
    ) -> None:
        super().__init__(spec, out_dim, hidden, num_layers, dropout)
        self.pspec = perm_spec_of(self.spec)
        self.encode, c_in = value_encoding(fourier_features, fourier_sigma)
        self.body, c = _equivariant_stack(
            lambda i, o: UNFLayer(self.pspec, i, o, reduction=reduction), c_in, hidden, num_layers,
            None, dropout,
        )  # fmt: skip
        self.pool = InvariantPool(self.pspec, c, reduction=reduction)
        self.head = self._invariant_head(self.pool.out_dim, 3, head_hidden, dropout)

    def forward(
        self, x: WeightSpace | Mapping[str, torch.Tensor] | Sequence[torch.Tensor]
    ) -> torch.Tensor:
        if isinstance(x, WeightSpace) and isinstance(self.spec, WeightSpaceSpec):
            self.check_input(x)
        xs = tensors_of(x, self.pspec)
        if self.encode is not None:
            xs = self.encode(xs)
        return self.head(self.pool(self.body(xs)))


class UNFEquivariant(WeightSpaceModel):
    """Equivariant UNF: weights in, new weights of the same spec out (editing, generation).

    The output is ``x + scale * f(x)`` with ``f`` a stack of UNF layers ending in one channel
    (``residual=True``), or ``f(x)``. Returns a :class:`WeightSpace` for a WeightSpace input,
    otherwise a list of ``[B, *shape]`` tensors in spec order.
    """

    spec_types = (WeightSpaceSpec, PermSpec)

    def __init__(
        self,
        spec: WeightSpaceSpec | PermSpec,
        hidden: int = 32,
        num_layers: int = 3,
        reduction: str = "mean",
        residual: bool = True,
    ) -> None:
        super().__init__(spec, None, hidden, num_layers)
        self.pspec = perm_spec_of(self.spec)
        self.body, _ = _equivariant_stack(
            lambda i, o: UNFLayer(self.pspec, i, o, reduction=reduction),
            1,
            hidden,
            num_layers,
            1,
            0.0,
        )
        self._residual_scale(residual)

    def forward(self, x: WeightSpace | Mapping[str, torch.Tensor] | Sequence[torch.Tensor]):
        if isinstance(x, WeightSpace) and isinstance(self.spec, WeightSpaceSpec):
            self.check_input(x)
        xs = tensors_of(x, self.pspec)
        ys = self.body(xs)
        out = [(v + self.scale * y) if self.residual else y for v, y in zip(xs, ys)]
        out = [v.squeeze(1) for v in out]
        if isinstance(x, WeightSpace):
            return WSFeatures.from_tensors(x.spec, [v.unsqueeze(1) for v in out]).to_weightspace()
        return out


__all__ = [
    "InvariantPool",
    "UNF",
    "UNFEquivariant",
    "UNFLayer",
    "tensors_of",
]
