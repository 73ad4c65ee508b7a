"""Symmetries of weight spaces: hidden-neuron permutations, positive scaling of ReLU neurons and
sign flips of neurons with odd activations (sine, tanh).

Both act on a :class:`WeightSpace` without changing the function each network computes.
Permutation ``p`` (of size ``spec.perm_sizes[p]``) reorders every axis the spec marks with ``p``:
the ``out`` axis (weight dim 1, bias dim 1) of layers whose ``out_perm`` is ``p`` and the ``in``
axis (weight dim 2, in blocks of ``in_repeat``) of layers whose ``in_perm`` is ``p``.
Permutations may differ per network: each is ``[n]`` (shared) or ``[B, n]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from metanet.weightspace.space import WeightSpace
from metanet.weightspace.spec import WeightSpaceError, WeightSpaceSpec


def random_permutation(
    spec: WeightSpaceSpec, generator: torch.Generator | None = None, batch: int | None = None
) -> list[torch.Tensor]:
    """A random permutation per neuron permutation of ``spec``: ``[n]`` or ``[batch, n]`` each."""
    if batch is None:
        return [torch.randperm(n, generator=generator) for n in spec.perm_sizes]
    return [
        torch.stack([torch.randperm(n, generator=generator) for _ in range(batch)])
        for n in spec.perm_sizes
    ]


def identity_permutation(spec: WeightSpaceSpec) -> list[torch.Tensor]:
    """The identity element: ``arange(n)`` per neuron permutation."""
    return [torch.arange(n) for n in spec.perm_sizes]


def invert_permutation(perms: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Inverse of each permutation (``[n]`` or ``[B, n]``)."""
    return [torch.argsort(p, dim=-1) for p in perms]


def _take(t: torch.Tensor, perm: torch.Tensor, dim: int, repeat: int = 1) -> torch.Tensor:
    """``t`` with axis ``dim`` reordered by ``perm`` (``[n]`` or ``[B, n]``), ``repeat``-blocks."""
    if repeat > 1:
        offsets = torch.arange(repeat, device=perm.device)
        perm = (perm.unsqueeze(-1) * repeat + offsets).flatten(-2)
    perm = perm.to(t.device)
    if perm.dim() == 1:
        return t.index_select(dim, perm)
    if perm.shape[0] != t.shape[0]:
        raise WeightSpaceError(
            f"per-network permutation has batch {perm.shape[0]}, not {t.shape[0]}"
        )
    shape = [1] * t.dim()
    shape[0], shape[dim] = t.shape[0], perm.shape[1]
    index = perm.view(shape).expand(*t.shape[:dim], perm.shape[1], *t.shape[dim + 1 :])
    return t.gather(dim, index)


def _check(spec: WeightSpaceSpec, perms: Sequence[torch.Tensor], what: str) -> None:
    if len(perms) != spec.num_perms:
        raise WeightSpaceError(f"expected {spec.num_perms} {what}, got {len(perms)}")
    for p, (t, n) in enumerate(zip(perms, spec.perm_sizes)):
        if t.shape[-1] != n:
            raise WeightSpaceError(f"{what} {p} has size {t.shape[-1]}, expected {n}")


def permute(ws: WeightSpace, perms: Sequence[torch.Tensor]) -> WeightSpace:
    """Apply hidden-neuron permutations: neuron ``perms[p][j]`` moves to position ``j``.

    The permuted networks compute exactly the same function as the originals.
    """
    _check(ws.spec, perms, "permutations")
    weights, biases = [], []
    for layer, w, b in zip(ws.spec.layers, ws.weights, ws.biases):
        if layer.out_perm is not None:
            w = _take(w, perms[layer.out_perm], 1)
            b = _take(b, perms[layer.out_perm], 1)
        if layer.in_perm is not None:
            w = _take(w, perms[layer.in_perm], 2, layer.in_repeat)
        weights.append(w)
        biases.append(b)
    return WeightSpace(ws.spec, weights, biases)


def relu_scale(ws: WeightSpace, scales: Sequence[torch.Tensor]) -> WeightSpace:
    """Positive rescaling of hidden neurons: neuron ``j`` of permutation ``p`` is multiplied by
    ``scales[p][..., j] > 0`` on its incoming weights and bias, and divided on its outgoing ones.

    Networks whose hidden activations are positively homogeneous (ReLU, LeakyReLU, no norm layer
    between) compute the same function afterwards. ``scales[p]`` is ``[n]`` or ``[B, n]``.
    """
    _check(ws.spec, scales, "scales")
    if any(bool((s <= 0).any()) for s in scales):
        raise WeightSpaceError("ReLU scaling factors must be positive")
    return _scale_neurons(ws, scales)


def flip_signs(ws: WeightSpace, signs: Sequence[torch.Tensor]) -> WeightSpace:
    """Sign flips of hidden neurons: neuron ``j`` of permutation ``p`` has its incoming weights,
    its bias and its outgoing weights multiplied by ``signs[p][..., j]`` in ``{-1, +1}``.

    Networks whose hidden activations are odd (sine, tanh; ``act(-x) = -act(x)``, no norm layer
    between) compute the same function afterwards: a SIREN's neurons have this symmetry on top
    of permutations. ``signs[p]`` is ``[n]`` or ``[B, n]``.
    """
    _check(ws.spec, signs, "signs")
    if any(bool((s.abs() != 1).any()) for s in signs):
        raise WeightSpaceError("sign flips must be -1 or +1")
    return _scale_neurons(ws, signs)


def random_signs(
    spec: WeightSpaceSpec, batch: int, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """Uniform random signs ``[batch, n]`` in ``{-1, +1}`` per neuron permutation."""
    return [
        torch.randint(0, 2, (batch, n), generator=generator).float() * 2 - 1
        for n in spec.perm_sizes
    ]


def canonical_relu_scales(ws: WeightSpace, eps: float = 1e-12) -> list[torch.Tensor]:
    """The positive scales ``[B, n]`` per permutation that put every network in scale-canonical
    form: each hidden neuron's incoming weights and bias together have unit Euclidean norm, and
    the factor is pushed into its outgoing weights (:func:`relu_scale`).

    Neurons are decided layer by layer from the input, each on its incoming weights as the
    scales of the layers before it leave them, so ``canonical_relu_scales`` of any rescaled copy
    yields the same canonical network: all the scale freedom ends in the output layer. A
    permutation is decided by the first layer whose outputs it indexes; a neuron whose incoming
    weights and bias are all zero (norm below ``eps``) keeps scale 1.
    """

    def decide(rows: torch.Tensor) -> torch.Tensor:
        norm = rows.norm(dim=-1)
        return torch.where(norm > eps, 1.0 / norm.clamp_min(eps), torch.ones_like(norm))

    return _canonical_factors(ws, decide)


def _canonical_factors(
    ws: WeightSpace, decide: Callable[[torch.Tensor], torch.Tensor]
) -> list[torch.Tensor]:
    """Per-neuron factors ``[B, n]`` per permutation (for :func:`_scale_neurons`), decided layer
    by layer from the input: ``decide(rows [B, out, in*k + 1]) -> [B, out]`` sees each neuron's
    incoming weights and bias as the factors of the layers before leave them (divided by the
    factor of each input neuron). A permutation is decided by the first layer it indexes the
    outputs of; one no layer decides gets factor 1."""
    decided: dict[int, torch.Tensor] = {}
    for layer, w, b in zip(ws.spec.layers, ws.weights, ws.biases):
        p = layer.out_perm
        if p is None or p in decided:
            continue
        w = w.flatten(3) if w.dim() > 3 else w.unsqueeze(-1)  # [B, out, in, k]
        if layer.in_perm is not None:  # incoming weights after the earlier layers' factors
            s = decided[layer.in_perm].repeat_interleave(layer.in_repeat, dim=-1).to(w)
            w = w / s[:, None, :, None]
        decided[p] = decide(torch.cat([w.flatten(2), b.unsqueeze(-1)], dim=-1))
    batch = len(ws)
    return [decided.get(p, torch.ones(batch, n)) for p, n in enumerate(ws.spec.perm_sizes)]


def relu_scale_canonical(ws: WeightSpace) -> WeightSpace:
    """``ws`` in scale-canonical form (:func:`canonical_relu_scales`): one representative per
    orbit of positive hidden-neuron rescalings. Function-preserving only for positively
    homogeneous activations (ReLU, LeakyReLU) with no norm layer between."""
    return _scale_neurons(ws, canonical_relu_scales(ws))


def _scale_neurons(ws: WeightSpace, scales: Sequence[torch.Tensor]) -> WeightSpace:
    """Multiply each hidden neuron's incoming weights and bias by its factor and divide its
    outgoing weights by it (no check of the factors)."""
    weights, biases = [], []
    for layer, w, b in zip(ws.spec.layers, ws.weights, ws.biases):
        extra = w.dim() - 3
        if layer.out_perm is not None:
            s = scales[layer.out_perm].to(w)
            s = s.expand(w.shape[0], -1) if s.dim() == 1 else s
            w = w * s.reshape(*s.shape, 1, *([1] * extra))
            b = b * s
        if layer.in_perm is not None:
            s = scales[layer.in_perm].to(w)
            s = s.expand(w.shape[0], -1) if s.dim() == 1 else s
            s = s.repeat_interleave(layer.in_repeat, dim=-1)
            w = w / s.reshape(s.shape[0], 1, s.shape[1], *([1] * extra))
        weights.append(w)
        biases.append(b)
    return WeightSpace(ws.spec, weights, biases)


def random_relu_scale(
    spec: WeightSpaceSpec,
    batch: int,
    low: float = 0.5,
    high: float = 2.0,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Log-uniform positive scales in ``[low, high]``, ``[batch, n]`` per neuron permutation."""
    lo, hi = torch.log(torch.tensor(low)), torch.log(torch.tensor(high))
    return [
        torch.exp(lo + (hi - lo) * torch.rand(batch, n, generator=generator))
        for n in spec.perm_sizes
    ]


def canonical_signs(ws: WeightSpace) -> list[torch.Tensor]:
    """The sign flips ``[B, n]`` per permutation that put every network in sign-canonical form:
    in each hidden neuron's incoming weights and bias, the entry of largest magnitude is
    positive.

    Neurons are decided layer by layer from the input, each on its incoming weights as the
    flips of the layers before it leave them (so the result does not depend on the signs a
    network came with: ``canonical_signs`` of any sign-flipped copy yields the same canonical
    network). A permutation is decided by the first layer whose outputs it indexes. For
    networks with odd activations (:func:`flip_signs`), ``flip_signs(ws, canonical_signs(ws))``
    computes the same functions and is the same for every network of a sign orbit, up to ties
    of largest magnitude (measure zero for continuous weights).
    """

    def decide(rows: torch.Tensor) -> torch.Tensor:
        top = rows.gather(-1, rows.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
        return torch.where(top < 0, -1.0, 1.0).to(torch.float32)

    return _canonical_factors(ws, decide)


def sign_canonical(ws: WeightSpace) -> WeightSpace:
    """``ws`` in sign-canonical form (:func:`canonical_signs`): one representative per orbit of
    hidden-neuron sign flips. Function-preserving for odd activations (sine, tanh) only."""
    return flip_signs(ws, canonical_signs(ws))
