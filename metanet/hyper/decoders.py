"""Parameter decoders of graph hypernetworks: node embedding -> parameter tensor of any shape.

Both decoders map node embeddings ``h [P, d]`` (one row per parameter tensor to predict) to
*raw* tensors of the requested shapes; :func:`normalize_scaled` (the default of new GHNs) or
:func:`normalize_param` (GHN-2's fan-in scaling, checkpoints saved before it) then sets their
scale. Matrix/kernel parameters (``dim >= 2``: ``[out, in, *kernel]``) and vector parameters
(biases, norm affine, ``[out]``) have separate heads.

* :class:`TilingDecoder` (GHN-2/3): an MLP predicts a fixed chunk ``[chunk_out, chunk_in, k, k]``
  that is tiled (repeated) along every axis to cover the target and sliced to it; kernels
  smaller than ``k`` take the centre crop. Output layer size ``chunk_out*chunk_in*k*k``.
* :class:`LowRankDecoder` (LoGAH, Zhou et al. 2024): the MLP predicts factors
  ``A [max_dim, r]``, ``B [r, max_dim]`` and kernel factors ``K [r, k, k]``;
  ``W[o, i, y, x] = sum_r A[o, r] B[r, i] K[r, y, x] / sqrt(r)`` with ``A``/``B`` tiled to the
  target width, so very wide targets are reached with ``(2 max_dim + k^2) r`` outputs instead of
  ``max_dim^2 k^2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["LowRankDecoder", "TilingDecoder", "fit_to", "normalize_param", "normalize_scaled"]

#: Ops whose parameters are norm scales / shifts (or a layer scale).
NORM_OPS = ("batchnorm", "layernorm", "groupnorm", "rmsnorm", "layer_scale")


def fit_to(t: Tensor, shape: Sequence[int], dims: Sequence[int]) -> Tensor:
    """Tile ``t`` along ``dims`` (repeat whole copies) until it covers ``shape`` there, then
    slice to ``shape``. Spatial (kernel) axes are centre-cropped when ``t`` is larger."""
    for d, size in zip(dims, shape):
        have = t.shape[d]
        if have < size:
            reps = [1] * t.dim()
            reps[d] = math.ceil(size / have)
            t = t.repeat(*reps)
        t = t.narrow(d, 0, size)
    return t


def _center(t: Tensor, kernel: Sequence[int], first: int) -> Tensor:
    """Centre-crop (or tile, when larger) the trailing kernel axes of ``t`` from axis ``first``."""
    for j, k in enumerate(kernel):
        d = first + j
        have = t.shape[d]
        if k <= have:
            t = t.narrow(d, (have - k) // 2, k)
        else:
            t = fit_to(t, [k], [d])
    return t


def _check_kernel(kernel: list[int]) -> list[int]:
    if len(kernel) > 2:
        raise ValueError(f"decoders predict 1-d and 2-d kernels only, got kernel {kernel}")
    return kernel


def _mlp(d_in: int, hidden: int, d_out: int, out_std: float) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.LayerNorm(hidden),
                        nn.Linear(hidden, d_out))  # fmt: skip
    nn.init.normal_(net[-1].weight, std=out_std / math.sqrt(hidden))
    nn.init.zeros_(net[-1].bias)
    return net


class _VectorHead(nn.Module):
    """``h [P, d] -> [P, size]`` tiled to each requested length (biases, norm affine)."""

    def __init__(self, d: int, hidden: int, size: int) -> None:
        super().__init__()
        self.size = size
        self.net = _mlp(d, hidden, size, out_std=0.1)

    def forward(self, h: Tensor, lengths: Sequence[int]) -> list[Tensor]:
        v = self.net(h)
        return [fit_to(v[j], [n], [0]) for j, n in enumerate(lengths)]


class TilingDecoder(nn.Module):
    """GHN-2/3 decoder: predict a ``[chunk_out, chunk_in, k, k]`` chunk, tile it to the target.

    Args:
        d: node embedding size.
        hidden: decoder MLP width.
        chunk_out / chunk_in: chunk size along the out / in axes.
        kernel: ``k`` (spatial chunk size; conv kernels are centre-cropped / tiled from it).
        vector_size: length of the predicted vector chunk (biases, norms); default ``chunk_out``.
    """

    def __init__(self, d: int, hidden: int = 64, chunk_out: int = 32, chunk_in: int = 32,
                 kernel: int = 3, vector_size: int | None = None) -> None:  # fmt: skip
        super().__init__()
        self.chunk = (int(chunk_out), int(chunk_in), int(kernel))
        self.matrix = _mlp(d, hidden, chunk_out * chunk_in * kernel * kernel, out_std=1.0)
        self.vector = _VectorHead(d, hidden, vector_size or chunk_out)

    def matrices(self, h: Tensor, shapes: Sequence[Sequence[int]]) -> list[Tensor]:
        """Raw tensors ``[out, in, *kernel]`` for node embeddings ``h [P, d]``."""
        co, ci, k = self.chunk
        chunks = self.matrix(h).view(-1, co, ci, k, k)
        out = []
        for j, shape in enumerate(shapes):
            kernel = list(shape[2:])
            c = chunks[j]
            if len(kernel) == 0:
                c = c[:, :, k // 2, k // 2]
            elif len(kernel) == 1:
                c = _center(c[:, :, :, k // 2], kernel, 2)
            else:
                c = _center(c, _check_kernel(kernel), 2)
            out.append(fit_to(c, shape[:2], [0, 1]))
        return out

    def vectors(self, h: Tensor, lengths: Sequence[int]) -> list[Tensor]:
        """Raw vectors ``[n]`` for node embeddings ``h [P, d]``."""
        return self.vector(h, lengths)


class LowRankDecoder(nn.Module):
    """LoGAH-style decoder: factors ``A [max_dim, r]``, ``B [r, max_dim]``, kernel ``K [r, k, k]``.

    Args:
        d: node embedding size.
        hidden: decoder MLP width.
        rank: ``r``.
        max_dim: rows of ``A`` / columns of ``B`` before tiling (targets up to this width get
            distinct rows).
        kernel: ``k`` of the kernel factors.
        vector_size: length of the predicted vector chunk (default ``max_dim``).
    """

    def __init__(self, d: int, hidden: int = 64, rank: int = 8, max_dim: int = 256,
                 kernel: int = 3, vector_size: int | None = None) -> None:  # fmt: skip
        super().__init__()
        self.rank, self.max_dim, self.kernel = int(rank), int(max_dim), int(kernel)
        r, m = self.rank, self.max_dim
        self.factors = _mlp(d, hidden, 2 * m * r + r * kernel * kernel, out_std=1.0)
        self.vector = _VectorHead(d, hidden, vector_size or max_dim)

    def matrices(self, h: Tensor, shapes: Sequence[Sequence[int]]) -> list[Tensor]:
        """Raw tensors ``[out, in, *kernel]`` for node embeddings ``h [P, d]``."""
        r, m, k = self.rank, self.max_dim, self.kernel
        z = self.factors(h)
        a_all = z[:, : m * r].view(-1, m, r)
        b_all = z[:, m * r : 2 * m * r].view(-1, r, m)
        k_all = z[:, 2 * m * r :].view(-1, r, k, k)
        out = []
        for j, shape in enumerate(shapes):
            a = fit_to(a_all[j], [shape[0]], [0])  # [out, r]
            b = fit_to(b_all[j], [shape[1]], [1])  # [r, in]
            kernel = list(shape[2:])
            if not kernel:
                out.append(a @ b / math.sqrt(r))
                continue
            kf = k_all[j] if len(kernel) == 2 else k_all[j][:, :, k // 2]
            kf = _center(kf, _check_kernel(kernel), 1)
            # W[o, i, ...] = sum_r A[o, r] B[r, i] K[r, ...]: one [o*i, r] @ [r, k*k] product
            ab = (a.unsqueeze(1) * b.t().unsqueeze(0)).reshape(-1, r)
            w = (ab @ kf.reshape(r, -1)).reshape(shape[0], shape[1], *kf.shape[1:])
            out.append(w / math.sqrt(r))
        return out

    def vectors(self, h: Tensor, lengths: Sequence[int]) -> list[Tensor]:
        """Raw vectors ``[n]`` for node embeddings ``h [P, d]``."""
        return self.vector(h, lengths)


def normalize_param(raw: Tensor, role: str, op: str, last: bool = False,
                    fan_in: int | None = None) -> Tensor:  # fmt: skip
    """GHN-style normalisation of a raw predicted tensor.

    * weights with ``dim >= 2`` (linear, conv, attention projections): ``raw * sqrt(beta /
      fan_in)``, ``fan_in = prod(shape[1:])``, ``beta = 2`` (He gain) for hidden ops and ``1``
      for the last parametrised op before the output (the classifier) and for embedding tables
      (``[rows, dim]``: entries of variance ``1 / dim``, unit-norm rows in expectation);
    * norm scales (``weight`` of batch/layer/group/RMS norm) and layer scales (a 1-d parameter
      that multiplies a branch, ConvNeXt's ``gamma``): ``1 + raw``;
    * biases and norm shifts: ``raw / sqrt(fan_in)`` (``fan_in`` of the op's weight; 1 for norms).
    """
    if raw.dim() >= 2:
        fan = int(math.prod(raw.shape[1:]))
        beta = 1.0 if last or op == "embedding" else 2.0
        return raw * math.sqrt(beta / fan)
    if op in NORM_OPS:
        return 1.0 + raw if role == "weight" else raw
    return raw / math.sqrt(max(1, fan_in or 1))


def normalize_scaled(raw: Tensor, role: str, op: str, beta: float, gain: Tensor,
                     fan_in: int | None = None) -> Tensor:  # fmt: skip
    """Scale-aware normalisation of a raw predicted tensor (the default of new GHNs).

    GHN-2's :func:`normalize_param` multiplies the raw tensor by ``sqrt(beta / fan_in)``, so the
    predicted scale is the decoder's output scale times that, which nothing bounds: on a
    transformer a GHN that has not learnt the right output scale gives attention logits with
    std > 30 (one-hot attention) and a residual stream 20-50x the default init's. Here the scale
    is set explicitly and the decoder predicts the direction:

    * weights with ``dim >= 2`` (linear, conv, attention projections, embedding tables, position
      embeddings): ``gain * sqrt(beta / fan_in) * raw / rms(raw)``, ``fan_in = prod(shape[1:])``;
      the tensor has RMS ``gain * sqrt(beta / fan_in)`` exactly (He's when ``beta = 2``: the op
      feeds a rectifier; else ``beta = 1``: variance kept, e.g. attention projections, so query
      and key entries of unit variance give attention logits of unit variance, the last
      residual-branch layers and the classifier);
    * norm scales and layer scales: ``2 sigmoid(2 raw)``, in ``(0, 2)`` (1 at ``raw = 0``, slope
      1 there, like ``1 + raw``);
    * biases and norm shifts: ``tanh(raw) / sqrt(fan_in)`` (``fan_in`` of the op's weight; 1
      for norms), in ``(-1, 1) / sqrt(fan_in)`` (GHN-3 bounds them with a tanh too): a bias
      of attention's query / key projection cannot blow the logits up either.

    ``gain`` (a positive scalar tensor, 1 at initialisation) is predicted per tensor by the GHN
    (``softplus``, so it grows linearly in the GHN's output): the scale is something the GHN
    learns explicitly, not a side effect of the decoder's output magnitude.
    """
    if raw.dim() >= 2:
        fan = int(math.prod(raw.shape[1:]))
        rms = raw.pow(2).mean().add(1e-12).sqrt()
        return raw * (gain * math.sqrt(beta / fan) / rms)
    if op in NORM_OPS:
        return 2.0 * torch.sigmoid(2.0 * raw) if role == "weight" else torch.tanh(raw)
    return torch.tanh(raw) / math.sqrt(max(1, fan_in or 1))
