"""Small shared pieces of the weight-space models: a feature container and channel-wise layers.

Equivariant layers act on *feature-carrying* weight spaces: every weight of a network becomes a
vector of ``C`` channels. :class:`WSFeatures` stores them per layer as weights
``[B, C, out, in, *extra]`` and biases ``[B, C, out]`` (``extra`` is a conv kernel, or
``(in_repeat,)`` for a Linear fed by ``flatten``). The layers here act on each tensor separately
and never mix positions, so they commute with every neuron permutation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from metanet.weightspace import WeightSpace, WeightSpaceError, WeightSpaceSpec


@dataclass
class WSFeatures:
    """Channel-carrying weight-space features of ``B`` networks of one spec.

    Attributes:
        spec: the architecture the features belong to.
        weights: per layer ``[B, C, out, in, *extra]`` (neuron view: ``in`` counted in neurons).
        biases: per layer ``[B, C, out]``.
    """

    spec: WeightSpaceSpec
    weights: list[torch.Tensor]
    biases: list[torch.Tensor]

    @classmethod
    def from_weightspace(cls, ws: WeightSpace) -> WSFeatures:
        """One channel per weight: ``[B, 1, out, in, *extra]`` and ``[B, 1, out]``."""
        weights = [ws.neuron_view(i).unsqueeze(1) for i in range(ws.spec.num_layers)]
        return cls(ws.spec, weights, [b.unsqueeze(1) for b in ws.biases])

    def to_weightspace(self) -> WeightSpace:
        """Back to a :class:`WeightSpace`; needs exactly one channel. Missing biases become 0."""
        if self.channels != 1:
            raise WeightSpaceError(
                f"to_weightspace needs 1 channel, the features have {self.channels}"
            )
        weights, biases = [], []
        for layer, w, b in zip(self.spec.layers, self.weights, self.biases):
            w = w.squeeze(1)
            weights.append(w.reshape(w.shape[0], *layer.module_weight_shape))
            b = b.squeeze(1)
            biases.append(b if layer.has_bias else torch.zeros_like(b))
        return WeightSpace(self.spec, weights, biases)

    @property
    def channels(self) -> int:
        return self.weights[0].shape[1]

    def __len__(self) -> int:
        return self.weights[0].shape[0]

    def tensors(self) -> list[torch.Tensor]:
        """Flat list ``[w0, b0, w1, b1, ...]`` (the order of ``perm_spec_of``)."""
        out: list[torch.Tensor] = []
        for w, b in zip(self.weights, self.biases):
            out.extend((w, b))
        return out

    @classmethod
    def from_tensors(cls, spec: WeightSpaceSpec, tensors: Sequence[torch.Tensor]) -> WSFeatures:
        """Inverse of :meth:`tensors`."""
        if len(tensors) != 2 * spec.num_layers:
            raise WeightSpaceError(f"expected {2 * spec.num_layers} tensors, got {len(tensors)}")
        return cls(spec, list(tensors[0::2]), list(tensors[1::2]))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> WSFeatures:
        return WSFeatures(self.spec, [fn(w) for w in self.weights], [fn(b) for b in self.biases])

    def __add__(self, other: WSFeatures) -> WSFeatures:
        return WSFeatures(
            self.spec,
            [a + b for a, b in zip(self.weights, other.weights)],
            [a + b for a, b in zip(self.biases, other.biases)],
        )

    def cat_channels(self, other: WSFeatures) -> WSFeatures:
        """Concatenate the channels of two feature sets of the same spec."""
        return WSFeatures(
            self.spec,
            [torch.cat([a, b], 1) for a, b in zip(self.weights, other.weights)],
            [torch.cat([a, b], 1) for a, b in zip(self.biases, other.biases)],
        )


TensorList = list[torch.Tensor]


def as_tensor_list(x: WSFeatures | Sequence[torch.Tensor]) -> TensorList:
    """The flat tensor list of features given either as :class:`WSFeatures` or as a list."""
    return x.tensors() if isinstance(x, WSFeatures) else list(x)


class Pointwise(nn.Module):
    """An elementwise nonlinearity applied to every tensor (equivariant by construction)."""

    def __init__(self, fn: nn.Module | None = None) -> None:
        super().__init__()
        self.fn = fn if fn is not None else nn.ReLU()

    def forward(self, xs: Sequence[torch.Tensor]) -> TensorList:
        return [self.fn(x) for x in xs]


class ChannelDropout(nn.Module):
    """Dropout of whole channel entries, independently per tensor (equivariant in distribution)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(p)

    def forward(self, xs: Sequence[torch.Tensor]) -> TensorList:
        return [self.drop(x) for x in xs]


class ChannelLinear(nn.Module):
    """A channel-mixing linear map per tensor, shared over positions: ``[B, C, *] -> [B, D, *]``.

    Args:
        num_tensors: how many tensors the feature list holds (``2 * num_layers`` for a spec).
        in_channels, out_channels: ``C`` and ``D``.
    """

    def __init__(self, num_tensors: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        bound = 1.0 / in_channels**0.5
        self.weight = nn.Parameter(
            torch.empty(num_tensors, out_channels, in_channels).uniform_(-bound, bound)
        )
        self.bias = nn.Parameter(torch.zeros(num_tensors, out_channels))

    def forward(self, xs: Sequence[torch.Tensor]) -> TensorList:
        out = []
        for i, x in enumerate(xs):
            y = nn.functional.linear(x.movedim(1, -1), self.weight[i], self.bias[i])
            out.append(y.movedim(-1, 1))
        return out


class ChannelBatchNorm(nn.Module):
    """Batch norm per tensor and channel over the batch and all positions (DWS's ``BN``).

    Statistics are pooled over every position of a tensor, so the map is permutation equivariant.
    """

    def __init__(self, num_tensors: int, channels: int) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.BatchNorm1d(channels) for _ in range(num_tensors))

    def forward(self, xs: Sequence[torch.Tensor]) -> TensorList:
        return [norm(x.flatten(2)).view_as(x) for norm, x in zip(self.norms, xs)]


class FourierFeatures(nn.Module):
    """Random Fourier features ``[sin(2 pi v B), cos(2 pi v B)]`` of value vectors (NG's
    ``sin_emb``, NFN's Gaussian Fourier features), ``B ~ N(0, sigma^2)`` of shape
    ``[in_dim, num]`` fixed at construction, applied along ``axis``: ``in_dim -> 2 * num``
    values there. Every weight is encoded independently, so the map is equivariant.

    ``forward`` takes a tensor, or a weight-space feature container / tensor list (each tensor
    encoded along ``axis``, e.g. ``axis=1`` for ``[B, C, out, in, ...]`` weight features).
    """

    def __init__(self, in_dim: int = 1, num: int = 64, sigma: float = 1.0, axis: int = -1) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(in_dim, num) * sigma)
        self.axis = axis
        self.out_dim = 2 * num

    def _encode(self, v: torch.Tensor) -> torch.Tensor:
        z = (2 * math.pi) * (v.movedim(self.axis, -1) @ self.freqs.to(v.dtype))
        return torch.cat([z.sin(), z.cos()], -1).movedim(-1, self.axis)

    def forward(self, x: torch.Tensor | WSFeatures | TensorList) -> torch.Tensor | TensorList:
        if isinstance(x, torch.Tensor):
            return self._encode(x)
        return [self._encode(v) for v in as_tensor_list(x)]


def mlp_head(
    in_dim: int,
    hidden: int,
    out_dim: int,
    num_layers: int = 2,
    dropout: float = 0.0,
    activation: type[nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """An MLP ``in_dim -> hidden (x num_layers) -> out_dim`` (``activation`` after each hidden
    layer, then dropout when ``dropout > 0``), an invariant readout head."""
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(num_layers):
        mods += [nn.Linear(d, hidden), activation()]
        if dropout > 0:
            mods.append(nn.Dropout(dropout))
        d = hidden
    mods.append(nn.Linear(d, out_dim))
    return nn.Sequential(*mods)


def check_weightspace(ws: object, spec: WeightSpaceSpec, model: str) -> WeightSpace:
    """Validate a model input: a :class:`WeightSpace` of ``spec`` with finite values."""
    if not isinstance(ws, WeightSpace):
        raise TypeError(f"{model} expects a WeightSpace, got {type(ws).__name__}")
    if _structure(ws.spec) != _structure(spec):
        raise WeightSpaceError(
            f"{model} was built for another architecture: expected layers "
            f"{[l.weight_shape for l in spec.layers]}, "
            f"got {[l.weight_shape for l in ws.spec.layers]}"
        )
    for layer, w, b in zip(ws.spec.layers, ws.weights, ws.biases):
        if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
            raise WeightSpaceError(f"{model}: layer '{layer.name}' contains NaN or inf values")
    return ws


def _structure(spec: WeightSpaceSpec) -> list[tuple]:
    """What a model depends on: shapes and symmetry per layer (not module names or bias flags)."""
    return [(l.weight_shape, l.in_repeat, l.out_perm, l.in_perm) for l in spec.layers]
