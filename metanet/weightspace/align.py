"""Git Re-Basin weight matching (Ainsworth et al. 2023) and linear-interpolation loss barriers.

Two networks of one architecture that were trained independently usually sit in different
"basins": the straight line between their weights crosses a high-loss region. Permuting the hidden
neurons of one network does not change its function, so we look for the permutations that make
network ``b`` as similar as possible to network ``a``, weight by weight:

    max_P  sum_layers <W_a[l], P_l W_b[l] P_{l-1}^T>  (+ biases)

:func:`weight_matching` solves this by coordinate descent: permutations are visited in random
order; with all others fixed, the objective is linear in ``P_p``, so the best ``P_p`` is a linear
assignment problem (``scipy.optimize.linear_sum_assignment``) on the similarity matrix summed
over every axis the permutation acts on (rows of one layer and its bias, columns of the next
layer, conv kernels and ``in_repeat`` blocks of a flatten-fed Linear flattened into the feature
dimension). Sweeps repeat until no permutation changes.

Tensors outside the weight space that one hidden neuron owns — the weight and bias of a BatchNorm
after a conv, as in the permutation specs of Git Re-Basin's VGG/ResNet models, where a norm layer
shares the permutation of the preceding conv's output channels — join the objective of their
permutation through ``extra_a`` / ``extra_b``: ``{perm id: [tensor [n_p, ...], ...]}``, each
adding ``<x_a, P_p x_b>`` (an outer product of its rows) to that permutation's similarity.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from metanet.weightspace.space import WeightSpace
from metanet.weightspace.spec import WeightSpaceError, WeightSpaceSpec
from metanet.weightspace.symmetry import permute

__all__ = ["align", "interpolate", "loss_barrier", "weight_matching"]


def _network_tensors(ws: WeightSpace, spec: WeightSpaceSpec, what: str):
    """Per layer ``(weight [out, in, *extra], bias [out])`` of the single network in ``ws``."""
    if len(ws) != 1:
        raise WeightSpaceError(
            f"weight_matching aligns one network to one network; {what} holds {len(ws)} "
            f"(pass {what}[i])"
        )
    if len(ws.spec.layers) != len(spec.layers):
        raise WeightSpaceError(
            f"{what} has {len(ws.spec.layers)} layers, the spec {len(spec.layers)}"
        )
    out = []
    for i, (layer, own) in enumerate(zip(spec.layers, ws.spec.layers)):
        if own.module_weight_shape != layer.module_weight_shape:
            raise WeightSpaceError(
                f"{what}: layer '{own.name}' has weight shape {own.module_weight_shape}, the spec "
                f"expects {layer.module_weight_shape}"
            )
        w = ws.weights[i][0].detach().to(torch.float64)
        if layer.in_repeat > 1:
            w = w.reshape(layer.out_features, layer.in_features, layer.in_repeat)
        b = ws.biases[i][0].detach().to(torch.float64)
        if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
            raise WeightSpaceError(f"{what}: layer '{own.name}' contains NaN or inf values")
        out.append((w, b))
    return out


NeuronTensors = Mapping[int, Sequence[torch.Tensor]]


def _extra_tensors(
    extra_a: NeuronTensors | None, extra_b: NeuronTensors | None, spec: WeightSpaceSpec
) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Checked per-permutation pairs ``(x_a [n_p, m], x_b [n_p, m])`` (float64) of the extras."""
    extra_a, extra_b = dict(extra_a or {}), dict(extra_b or {})
    if sorted(extra_a) != sorted(extra_b):
        raise WeightSpaceError(
            f"extra_a and extra_b must name the same permutations, got {sorted(extra_a)} and "
            f"{sorted(extra_b)}"
        )
    out: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for p in sorted(extra_a):
        if not (isinstance(p, int) and 0 <= p < spec.num_perms):
            raise WeightSpaceError(
                f"extra tensors for permutation {p!r}; the spec has permutations "
                f"0..{spec.num_perms - 1}"
            )
        xs_a, xs_b = list(extra_a[p]), list(extra_b[p])
        if len(xs_a) != len(xs_b):
            raise WeightSpaceError(
                f"permutation {p}: {len(xs_a)} extra tensors in extra_a, {len(xs_b)} in extra_b"
            )
        n = spec.perm_sizes[p]
        pairs = []
        for k, (xa, xb) in enumerate(zip(xs_a, xs_b)):
            if xa.shape != xb.shape or xa.dim() == 0 or xa.shape[0] != n:
                raise WeightSpaceError(
                    f"permutation {p}, extra tensor {k}: shapes {tuple(xa.shape)} and "
                    f"{tuple(xb.shape)}, expected equal shapes [{n}, ...]"
                )
            xa = xa.detach().to(torch.float64).reshape(n, -1)
            xb = xb.detach().to(torch.float64).reshape(n, -1)
            if not (torch.isfinite(xa).all() and torch.isfinite(xb).all()):
                raise WeightSpaceError(
                    f"permutation {p}, extra tensor {k} contains NaN or inf values"
                )
            pairs.append((xa, xb))
        out[p] = pairs
    return out


def weight_matching(
    ws_a: WeightSpace,
    ws_b: WeightSpace,
    spec: WeightSpaceSpec | None = None,
    max_iter: int = 100,
    seed: int = 0,
    extra_a: NeuronTensors | None = None,
    extra_b: NeuronTensors | None = None,
) -> list[torch.Tensor]:
    """Permutations that align network ``ws_b`` to network ``ws_a`` (Git Re-Basin weight matching).

    Args:
        ws_a: the reference network (a batch of one).
        ws_b: the network to align (a batch of one, same layer shapes).
        spec: the permutation structure (default ``ws_a.spec``); a hand-built spec may share one
            permutation between several layers (residual MLPs).
        max_iter: maximum number of coordinate-descent sweeps over all permutations.
        seed: seeds the random order in which permutations are visited.
        extra_a, extra_b: per-neuron tensors outside the weight space, ``{perm id: [tensor
            [n_p, ...], ...]}`` of network a and b (same ids, counts and shapes; e.g. the weight
            and bias of a BatchNorm after the layer whose outputs permutation ``p`` reorders). Each
            adds ``x_a @ x_b.T`` to the similarity of its permutation; the caller permutes them
            along with the weights (``x_b[perms[p]]``).

    Returns:
        One ``LongTensor [n_p]`` per permutation of ``spec``; ``permute(ws_b, perms)`` computes the
        same function as ``ws_b`` and is aligned to ``ws_a``.

    Raises:
        WeightSpaceError: a batch that is not one network, mismatched shapes, NaN/inf weights
            or extra tensors.
    """
    spec = spec or ws_a.spec
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    ta = _network_tensors(ws_a, spec, "ws_a")
    tb = _network_tensors(ws_b, spec, "ws_b")
    extras = _extra_tensors(extra_a, extra_b, spec)
    perms = [torch.arange(n) for n in spec.perm_sizes]
    if not perms:
        return perms

    # For each permutation: the (layer, axis) pairs it acts on; axis 0 = rows (+ bias), 1 = columns.
    touches: list[list[tuple[int, int]]] = [[] for _ in spec.perm_sizes]
    for l, layer in enumerate(spec.layers):
        if layer.out_perm is not None:
            touches[layer.out_perm].append((l, 0))
        if layer.in_perm is not None:
            touches[layer.in_perm].append((l, 1))
    # The reference side never changes: flatten it once.
    flat_a = [
        [ta[l][0].movedim(axis, 0).reshape(spec.perm_sizes[p], -1) for l, axis in touches[p]]
        for p in range(len(perms))
    ]

    def permuted_b(l: int, except_axis: int) -> torch.Tensor:
        layer = spec.layers[l]
        w = tb[l][0]
        if layer.out_perm is not None and except_axis != 0:
            w = w.index_select(0, perms[layer.out_perm])
        if layer.in_perm is not None and except_axis != 1:
            w = w.index_select(1, perms[layer.in_perm])
        return w

    def similarity(p: int) -> torch.Tensor:
        n = spec.perm_sizes[p]
        sim = torch.zeros(n, n, dtype=torch.float64)
        for (l, axis), a in zip(touches[p], flat_a[p]):
            b = permuted_b(l, axis).movedim(axis, 0).reshape(n, -1)
            sim += a @ b.T
            if axis == 0:
                sim += torch.outer(ta[l][1], tb[l][1])
        for xa, xb in extras.get(p, ()):
            sim += xa @ xb.T
        return sim

    rng = np.random.default_rng(seed)
    rows = np.arange(max(spec.perm_sizes))
    for _ in range(max_iter):
        changed = False
        for p in rng.permutation(len(perms)):
            sim = similarity(int(p)).numpy()
            _, cols = linear_sum_assignment(sim, maximize=True)
            n = sim.shape[0]
            old = float(sim[rows[:n], perms[p].numpy()].sum())
            new = float(sim[rows[:n], cols].sum())
            if new > old + 1e-12 * max(1.0, abs(old)):
                perms[p] = torch.from_numpy(cols.astype(np.int64))
                changed = True
        if not changed:
            break
    return perms


def align(
    ws_a: WeightSpace,
    ws_b: WeightSpace,
    spec: WeightSpaceSpec | None = None,
    max_iter: int = 100,
    seed: int = 0,
) -> WeightSpace:
    """``ws_b`` permuted so that it is aligned to ``ws_a`` (same function as ``ws_b``)."""
    perms = weight_matching(ws_a, ws_b, spec=spec, max_iter=max_iter, seed=seed)
    if spec is not None and spec != ws_b.spec:
        return permute(WeightSpace(spec, ws_b.weights, ws_b.biases), perms)
    return permute(ws_b, perms)


def interpolate(ws_a: WeightSpace, ws_b: WeightSpace, lam: float | torch.Tensor) -> WeightSpace:
    """``(1 - lam) * ws_a + lam * ws_b``; ``lam`` is a float or a ``[B]`` tensor (one per net)."""
    if ws_a.spec != ws_b.spec:
        raise WeightSpaceError("cannot interpolate weight spaces of different specs")
    if len(ws_a) != len(ws_b):
        raise WeightSpaceError(f"batch sizes differ: {len(ws_a)} and {len(ws_b)}")
    if isinstance(lam, torch.Tensor) and lam.dim() > 0:
        if lam.shape != (len(ws_a),):
            raise WeightSpaceError(
                f"lam must be a float or [B={len(ws_a)}], got {tuple(lam.shape)}"
            )

        def mix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            t = lam.to(a).reshape(-1, *([1] * (a.dim() - 1)))
            return a + t * (b - a)
    else:
        t = float(lam)

        def mix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a + t * (b - a)

    return WeightSpace(
        ws_a.spec,
        [mix(a, b) for a, b in zip(ws_a.weights, ws_b.weights)],
        [mix(a, b) for a, b in zip(ws_a.biases, ws_b.biases)],
    )


def loss_barrier(
    evaluate: Callable[[WeightSpace], float],
    ws_a: WeightSpace,
    ws_b: WeightSpace,
    lambdas: Sequence[float] | int = 11,
) -> tuple[float, list[float]]:
    """Loss barrier on the straight line between two networks.

    ``barrier = max_lam  L((1-lam) a + lam b) - ((1-lam) L(a) + lam L(b))``, the height of the
    loss above the chord between the end points (0 when the path is no worse than the chord).

    Args:
        evaluate: loss of a one-network WeightSpace (e.g. cross-entropy on a data set).
        ws_a, ws_b: the end points (batches of one).
        lambdas: the interpolation points, or how many evenly spaced ones in ``[0, 1]``.

    Returns:
        ``(barrier, losses)`` with the loss at every interpolation point.
    """
    lams = list(np.linspace(0.0, 1.0, lambdas)) if isinstance(lambdas, int) else list(lambdas)
    if len(lams) < 2:
        raise ValueError("loss_barrier needs at least two interpolation points")
    losses = [float(evaluate(interpolate(ws_a, ws_b, float(t)))) for t in lams]
    la, lb = float(evaluate(ws_a)), float(evaluate(ws_b))
    barrier = max(l - ((1 - t) * la + t * lb) for t, l in zip(lams, losses))
    return float(barrier), losses
