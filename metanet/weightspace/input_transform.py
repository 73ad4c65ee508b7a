"""Exact transforms of a coordinate network's input: ``g(x) = f(A x + t)`` from ``f``'s weights.

An implicit neural representation (INR, e.g. a SIREN) maps coordinates ``x`` (``[d]``) to values;
its first layer computes ``W0 x + b0`` before any nonlinearity. Composing the network with an
affine map of its input is therefore a change of the first layer alone::

    W0 (A x + t) + b0 = (W0 A) x + (W0 t + b0)

so ``W0 <- W0 A`` and ``b0 <- b0 + W0 t`` give a network that computes ``f(A x + t)`` exactly, for
any activation and any depth. With ``A`` a rotation, a scaling or both and ``t`` a shift, the new
network draws the rotated / zoomed / shifted image (the pixel at ``x`` shows what ``f`` drew at
``A x + t``). These are the INR augmentations of DWSNets (Navon et al. 2023) and of Shamsian et al.
(2023): new training networks whose label is known, made in weight space.

* :func:`affine_input` - apply given ``A`` (``[d, d]`` or ``[B, d, d]``) and ``t`` (``[d]`` or
  ``[B, d]``) to every network of a batch.
* :func:`random_affine` - draw a rotation angle, a scale and a shift per network.
"""

from __future__ import annotations

import math

import torch

from metanet.weightspace.space import WeightSpace
from metanet.weightspace.spec import WeightSpaceError

__all__ = ["affine_input", "random_affine"]


def _first_layer(ws: WeightSpace) -> int:
    """Input dimension ``d`` of the networks' first layer; a clear error unless it is a Linear
    layer reading the coordinates directly."""
    layer = ws.spec.layers[0]
    if layer.kind != "linear":
        raise WeightSpaceError(
            f"input transforms need a coordinate network whose first layer is Linear; layer "
            f"'{layer.name}' is {layer.kind}"
        )
    return layer.in_features


def affine_input(
    ws: WeightSpace, matrix: torch.Tensor | None = None, offset: torch.Tensor | None = None
) -> WeightSpace:
    """Networks computing ``f(matrix @ x + offset)`` where ``ws`` computes ``f(x)``.

    Args:
        ws: ``B`` coordinate networks; the first layer must be Linear with ``d`` inputs.
        matrix: ``[d, d]`` (one for all) or ``[B, d, d]``; ``None`` is the identity.
        offset: ``[d]`` or ``[B, d]``; ``None`` is zero. Needs the first layer to have a bias.

    Returns:
        A new :class:`WeightSpace`; only the first layer's weight and bias change.
    """
    d = _first_layer(ws)
    w0, b0 = ws.weights[0], ws.biases[0]  # [B, out, d], [B, out]
    if matrix is not None:
        a = matrix.to(w0)
        if a.shape[-2:] != (d, d) or a.dim() not in (2, 3) or (a.dim() == 3 and len(a) != len(ws)):
            raise WeightSpaceError(
                f"matrix must be [{d}, {d}] or [{len(ws)}, {d}, {d}] for a first layer with {d} "
                f"inputs, got {list(a.shape)}"
            )
        new_w0 = w0 @ a
    else:
        new_w0 = w0
    new_b0 = b0
    if offset is not None:
        if not ws.spec.layers[0].has_bias:
            raise WeightSpaceError(
                f"a shift of the input folds into the first layer's bias, and layer "
                f"'{ws.spec.layers[0].name}' has none"
            )
        t = offset.to(w0)
        if t.shape[-1] != d or t.dim() not in (1, 2) or (t.dim() == 2 and len(t) != len(ws)):
            raise WeightSpaceError(f"offset must be [{d}] or [{len(ws)}, {d}], got {list(t.shape)}")
        t = t.expand(len(ws), d)
        new_b0 = b0 + (w0 @ t.unsqueeze(-1)).squeeze(-1)
    return WeightSpace(ws.spec, [new_w0, *ws.weights[1:]], [new_b0, *ws.biases[1:]])


def _uniform(batch: int, low: float, high: float, generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(batch, generator=generator)


def random_affine(
    batch: int,
    dim: int,
    degrees: float = 0.0,
    translate: float = 0.0,
    scale: tuple[float, float] = (1.0, 1.0),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(matrix [batch, dim, dim], offset [batch, dim])`` for :func:`affine_input`.

    ``matrix = s * R(theta)`` with ``theta ~ U(-degrees, degrees)`` (a rotation of the first two
    coordinates; ``dim`` must be 2 when ``degrees > 0``) and ``s ~ U(scale)``; every coordinate of
    ``offset`` is ``U(-translate, translate)``.
    """
    if degrees < 0 or translate < 0:
        raise ValueError(f"degrees and translate must be >= 0, got {degrees}, {translate}")
    if not 0 < scale[0] <= scale[1]:
        raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale}")
    if degrees > 0 and dim != 2:
        raise WeightSpaceError(f"a rotation of the input needs 2-D coordinates, got {dim}-D")
    matrix = torch.eye(dim).repeat(batch, 1, 1)
    if degrees > 0:
        theta = _uniform(batch, -degrees, degrees, generator) * (math.pi / 180)
        cos, sin = torch.cos(theta), torch.sin(theta)
        matrix = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    matrix = matrix * _uniform(batch, *scale, generator).reshape(-1, 1, 1)
    offset = _uniform(batch * dim, -translate, translate, generator).reshape(batch, dim)
    return matrix, offset
