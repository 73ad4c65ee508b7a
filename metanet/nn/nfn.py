"""Neural functionals (Zhou et al. 2023): NP / HNP equivariant layers, pooling, encodings, models.

Two symmetry groups of an MLP/CNN weight space:

* **HNP** (hidden neuron permutations): only hidden neurons (channels) may be permuted; the
  network's input and output neurons are fixed. :class:`HNPLinear` is the maximal linear layer
  for this group: input/output neuron axes (and conv kernels, ``in_repeat`` blocks) carry no
  symmetry and are folded into channels, every other term comes from the parameter-sharing
  enumeration of :mod:`metanet.nn.unf_terms`.
* **NP** (neuron permutations): input and output neurons are treated as permutable too, which gives
  far fewer parameters (no dense maps over pixels/classes). Since the real symmetry is only HNP,
  NFN models break the extra symmetry with IO encodings (:class:`IOSinusoidalEncoding` or
  :class:`LearnedIOEmbedding`) added as channels before the first NP layer.

Conv kernels are extra channel dims in both. Features are :class:`~metanet.nn.layers.WSFeatures`
or the flat list ``[w0, b0, w1, b1, ...]`` with weights ``[B, C, out, in, *extra]``, biases
``[B, C, out]``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from metanet.nn.base import WeightSpaceModel, value_encoding
from metanet.nn.layers import (
    ChannelDropout,
    FourierFeatures,
    Pointwise,
    TensorList,
    WSFeatures,
    as_tensor_list,
)
from metanet.nn.unf import InvariantPool, UNFLayer, tensors_of
from metanet.weightspace import WeightSpace, WeightSpaceError, WeightSpaceSpec


def _require_chain(spec: WeightSpaceSpec, what: str) -> None:
    if not isinstance(spec, WeightSpaceSpec):
        raise TypeError(f"{what} needs a WeightSpaceSpec, got {type(spec).__name__}")
    if not spec.is_chain:
        raise WeightSpaceError(
            f"{what} is written for feed-forward chains (one permutation per hidden layer); "
            "use metanet.nn.unf.UNFLayer for specs that share permutations between layers"
        )


class HNPLinear(UNFLayer):
    """Linear layer equivariant to hidden-neuron permutations of an MLP/CNN chain (exact HNP).

    Args:
        spec: the weight space (a feed-forward chain).
        in_channels, out_channels: channels per weight.
    """

    def __init__(self, spec: WeightSpaceSpec, in_channels: int, out_channels: int) -> None:
        _require_chain(spec, "HNPLinear")
        super().__init__(spec, in_channels, out_channels, io_symbols=False)


class NPLinear(UNFLayer):
    """Linear layer equivariant to permutations of *all* neurons, input and output included (NP).

    Args:
        spec: the weight space (a feed-forward chain).
        in_channels, out_channels: channels per weight.
    """

    def __init__(self, spec: WeightSpaceSpec, in_channels: int, out_channels: int) -> None:
        _require_chain(spec, "NPLinear")
        super().__init__(spec, in_channels, out_channels, io_symbols=True)


class HNPPool(InvariantPool):
    """Pool over hidden axes, keep input neurons of layer 0 and output neurons of the last layer.

    ``-> [B, channels * (sum over tensors of their unpermuted sizes)]``.
    """

    def __init__(self, spec: WeightSpaceSpec, channels: int, reduction: str = "mean") -> None:
        super().__init__(spec, channels, reduction=reduction, io_symbols=False)


class NPPool(InvariantPool):
    """Pool over every neuron axis (kernels stay as features): ``-> [B, channels * F]``."""

    def __init__(self, spec: WeightSpaceSpec, channels: int, reduction: str = "mean") -> None:
        super().__init__(spec, channels, reduction=reduction, io_symbols=True)


def fourier_encode(x: torch.Tensor, max_freq: float, num_bands: int) -> torch.Tensor:
    """``[n] -> [n, 2 * num_bands + 1]``: sin/cos of ``pi * x * f`` for ``num_bands`` frequencies
    ``f`` in ``[1, max_freq / 2]``, plus ``x`` itself."""
    freqs = torch.linspace(1.0, max_freq / 2, num_bands, dtype=x.dtype, device=x.device)
    angles = x.unsqueeze(-1) * freqs * math.pi
    return torch.cat([angles.sin(), angles.cos(), x.unsqueeze(-1)], dim=-1)


class IOSinusoidalEncoding(nn.Module):
    """Append ``2 * num_bands + 1`` channels encoding layer index, input and output neuron position.

    Every weight of layer ``i`` gets the sinusoidal code of ``i`` (constant over positions, so
    hidden-permutation equivariance is kept); weights of the first layer add the code of their
    input neuron, weights and bias of the last layer the code of their output neuron. This breaks
    the input/output permutation symmetry that NP layers would otherwise have.
    """

    def __init__(
        self, spec: WeightSpaceSpec, max_freq: float = 10.0, num_bands: int = 6,
        encode_layers: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        _require_chain(spec, "IOSinusoidalEncoding")
        self.spec, self.max_freq, self.num_bands = spec, max_freq, num_bands
        self.encode_layers = encode_layers
        self.added_channels = 2 * num_bands + 1

    def forward(self, x: WSFeatures | TensorList) -> TensorList:
        xs = as_tensor_list(x)
        ref = xs[0]
        kw = {"dtype": ref.dtype, "device": ref.device}
        n_layers = self.spec.num_layers
        layer_code = fourier_encode(
            torch.linspace(-1, 1, n_layers, **kw), self.max_freq, self.num_bands
        )
        if not self.encode_layers:
            layer_code = torch.zeros_like(layer_code)
        n_in, n_out = self.spec.layers[0].in_features, self.spec.layers[-1].out_features
        in_code = fourier_encode(torch.linspace(-1, 1, n_in, **kw), self.max_freq, self.num_bands)
        out_code = fourier_encode(torch.linspace(-1, 1, n_out, **kw), self.max_freq, self.num_bands)
        d = self.added_channels
        out = []
        for i in range(n_layers):
            w, b = xs[2 * i], xs[2 * i + 1]
            batch, _, n_o, n_i, *extra = w.shape
            ones = [1] * len(extra)
            wc = layer_code[i].view(1, d, 1, 1, *ones).expand(batch, d, n_o, n_i, *extra)
            bc = layer_code[i].view(1, d, 1).expand(batch, d, n_o)
            if i == 0:
                wc = wc + in_code.t().reshape(1, d, 1, n_i, *ones)
            if i == n_layers - 1:
                wc = wc + out_code.t().reshape(1, d, n_o, 1, *ones)
                bc = bc + out_code.t().unsqueeze(0)
            out += [torch.cat([w, wc], 1), torch.cat([b, bc], 1)]
        return out


class LearnedIOEmbedding(nn.Module):
    """Add learned embeddings (``channels`` wide) per layer, input neuron and output neuron."""

    def __init__(self, spec: WeightSpaceSpec, channels: int) -> None:
        super().__init__()
        _require_chain(spec, "LearnedIOEmbedding")
        self.spec = spec
        n = spec.num_layers
        self.layer_w = nn.Parameter(torch.randn(n, channels) * 0.1)
        self.layer_b = nn.Parameter(torch.randn(n, channels) * 0.1)
        self.inp = nn.Parameter(torch.randn(spec.layers[0].in_features, channels) * 0.1)
        self.out = nn.Parameter(torch.randn(spec.layers[-1].out_features, channels) * 0.1)
        self.added_channels = 0

    def forward(self, x: WSFeatures | TensorList) -> TensorList:
        xs = as_tensor_list(x)
        n = self.spec.num_layers
        out = []
        for i in range(n):
            w, b = xs[2 * i], xs[2 * i + 1]
            ones = [1] * (w.dim() - 4)
            w = w + self.layer_w[i].view(1, -1, 1, 1, *ones)
            b = b + self.layer_b[i].view(1, -1, 1)
            if i == 0:
                w = w + self.inp.t().reshape(1, self.inp.shape[1], 1, -1, *ones)
            if i == n - 1:
                w = w + self.out.t().reshape(1, self.out.shape[1], -1, 1, *ones)
                b = b + self.out.t().unsqueeze(0)
            out += [w, b]
        return out


def _make_layer(mode: str, spec: WeightSpaceSpec, c_in: int, c_out: int) -> UNFLayer:
    if mode == "HNP":
        return HNPLinear(spec, c_in, c_out)
    if mode == "NP":
        return NPLinear(spec, c_in, c_out)
    raise ValueError(f"mode must be 'HNP' or 'NP', got {mode!r}")


class _NFNBody(nn.Module):
    """Encodings, then ``num_layers`` NP/HNP layers with ReLU (and optional channel dropout)."""

    def __init__(
        self, spec: WeightSpaceSpec, hidden: int, num_layers: int, mode: str,
        io_encoding: str | None, fourier_features: int, fourier_sigma: float, dropout: float,
        out_channels: int | None,
    ) -> None:  # fmt: skip
        super().__init__()
        _require_chain(spec, "NFN")
        if io_encoding == "auto":
            io_encoding = "sinusoidal" if mode == "NP" else None
        mods: list[nn.Module] = []
        enc, c = value_encoding(fourier_features, fourier_sigma)
        if enc is not None:
            mods.append(enc)
        if io_encoding == "sinusoidal":
            sin = IOSinusoidalEncoding(spec)
            mods.append(sin)
            c += sin.added_channels
        elif io_encoding == "learned":
            mods.append(LearnedIOEmbedding(spec, c))
        elif io_encoding is not None:
            raise ValueError(
                f"io_encoding must be 'auto', 'sinusoidal', 'learned' or None, got {io_encoding!r}"
            )
        for d in range(num_layers):
            last = d == num_layers - 1 and out_channels is not None
            c_out = out_channels if last else hidden
            mods.append(_make_layer(mode, spec, c, c_out))
            if not last:
                mods.append(Pointwise(nn.ReLU()))
                if dropout > 0:
                    mods.append(ChannelDropout(dropout))
            c = c_out
        self.mods = nn.ModuleList(mods)
        self.out_channels = c

    def forward(self, xs: TensorList) -> TensorList:
        for m in self.mods:
            xs = m(xs)
        return xs


class NFN(WeightSpaceModel):
    """Invariant NFN (generalization prediction, INR classification): ``ws -> [B, out_dim]``.

    Args:
        spec: weight space of the input networks (MLP, CNN, SIREN chain).
        out_dim: outputs (1 for accuracy regression, classes for INR classification).
        hidden: channels of the equivariant layers.
        num_layers: number of NP/HNP layers.
        mode: ``"HNP"`` (exact hidden-neuron symmetry) or ``"NP"`` (cheaper, with IO encodings).
        head_hidden: width of the 2-layer MLP head after pooling.
        io_encoding: ``"auto"`` (none), ``"sinusoidal"``, ``"learned"`` or ``None``. Without
            an encoding an NP model is also invariant to permutations of the input pixels and
            output classes. On the digits-cnn zoo the sinusoidal code's constant channels drown
            the weights' signal (NP-NFN with it learned a constant predictor, R^2 0.002), so
            the invariant model uses none unless asked; see BENCHMARKS.md.
        fourier_features: if > 0, random Fourier features of weight values with this many
            frequencies (NFN's INR classification input encoding).
        fourier_sigma: std of those frequencies.
        dropout: channel dropout between layers and dropout in the head.
    """

    def __init__(
        self,
        spec: WeightSpaceSpec,
        out_dim: int = 1,
        hidden: int = 32,
        num_layers: int = 3,
        mode: str = "HNP",
        head_hidden: int = 256,
        io_encoding: str | None = "auto",
        fourier_features: int = 0,
        fourier_sigma: float = 10.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(spec, out_dim, hidden, num_layers, dropout)
        spec, self.mode = self.spec, mode
        if io_encoding == "auto":
            io_encoding = None
        self.body = _NFNBody(
            spec,
            hidden,
            num_layers,
            mode,
            io_encoding,
            fourier_features,
            fourier_sigma,
            dropout,
            None,
        )
        pool_cls = HNPPool if mode == "HNP" else NPPool
        self.pool = pool_cls(spec, self.body.out_channels)
        self.head = self._invariant_head(self.pool.out_dim, 3, head_hidden, dropout)

    def _model_name(self) -> str:
        return f"NFN-{self.mode}"

    def extra_repr(self) -> str:
        return f"mode={self.mode}, {super().extra_repr()}"

    def forward(self, ws: WeightSpace) -> torch.Tensor:
        self.check_input(ws)
        xs = self.body(tensors_of(ws, self.pool.pspec))
        return self.head(self.pool(xs))


class NFNEquivariant(WeightSpaceModel):
    """Equivariant NFN: ``WeightSpace -> WeightSpace`` of the same spec (weight editing).

    Returns ``ws + scale * f(ws)`` (``residual=True``) or ``f(ws)``; ``f`` ends in one channel.
    """

    def __init__(
        self,
        spec: WeightSpaceSpec,
        hidden: int = 32,
        num_layers: int = 3,
        mode: str = "HNP",
        io_encoding: str | None = "auto",
        residual: bool = True,
    ) -> None:
        super().__init__(spec, None, hidden, num_layers)
        self.mode = mode
        self.body = _NFNBody(self.spec, hidden, num_layers, mode, io_encoding, 0, 10.0, 0.0, 1)
        self._residual_scale(residual)

    def _model_name(self) -> str:
        return f"NFNEquivariant-{self.mode}"

    def extra_repr(self) -> str:
        return f"mode={self.mode}, {super().extra_repr()}"

    def forward(self, ws: WeightSpace) -> WeightSpace:
        self.check_input(ws)
        feats = WSFeatures.from_weightspace(ws)
        ys = self.body(feats.tensors())
        out = WSFeatures.from_tensors(self.spec, ys)
        if self.residual:
            out = feats + out.map(lambda t: self.scale * t)
        return out.to_weightspace()


__all__ = [
    "FourierFeatures",
    "HNPLinear",
    "HNPPool",
    "IOSinusoidalEncoding",
    "LearnedIOEmbedding",
    "NFN",
    "NFNEquivariant",
    "NPLinear",
    "NPPool",
    "fourier_encode",
]
