"""Canonicalization of a zoo before generative training, and alignment-aware distances.

Every network of a zoo is one point of a permutation orbit: permuting its hidden neurons gives the
same function at a different place in weight space. A generator trained on raw weights has to model
all ``prod_i n_i!`` copies at once; after *canonicalization* — aligning every network to one
reference network with Git Re-Basin weight matching (:func:`metanet.weightspace.weight_matching`)
— it only sees the copy of each function that is closest to the reference (DeepWeightFlow).

:func:`canonicalize` aligns a batch to a reference; :func:`nearest_distances` measures how far each
generated network is from the nearest training network *after alignment* (both sides brought to the
reference frame), which is what novelty/memorization statistics need.
"""

from __future__ import annotations

import torch

from metanet.weightspace import WeightSpace, WeightSpaceSpec, permute, weight_matching

__all__ = ["canonicalize", "nearest_distances", "pick_reference"]


def pick_reference(ws: WeightSpace, scores: torch.Tensor | None = None) -> int:
    """Index of the reference network: the best-scoring one, else the medoid of the batch.

    Args:
        ws: ``B`` networks.
        scores: optional ``[B]`` (e.g. test accuracy; higher is better).
    """
    if scores is not None:
        if scores.shape != (len(ws),):
            raise ValueError(f"scores must be [{len(ws)}], got {tuple(scores.shape)}")
        return int(torch.argmax(scores))
    flat = ws.flatten().double()
    return int(torch.cdist(flat, flat).sum(1).argmin())


def canonicalize(
    ws: WeightSpace,
    reference: WeightSpace | int = 0,
    spec: WeightSpaceSpec | None = None,
    max_iter: int = 100,
    seed: int = 0,
) -> WeightSpace:
    """Every network of ``ws`` permuted into the frame of ``reference`` (same functions).

    Args:
        ws: ``B`` networks of one spec.
        reference: a one-network WeightSpace, or the index of the reference inside ``ws``
            (that network is returned unchanged).
        spec: permutation structure (default ``ws.spec``).
        max_iter, seed: passed to :func:`weight_matching`.

    Returns:
        A WeightSpace of ``B`` networks; network ``i`` computes the same function as ``ws[i]``.
    """
    if isinstance(reference, int):
        if not -len(ws) <= reference < len(ws):
            raise IndexError(f"reference index {reference} out of range for {len(ws)} networks")
        reference = ws[reference]
    if len(reference) != 1:
        raise ValueError(f"the reference must be one network, got {len(reference)}")
    spec = spec or ws.spec
    out = []
    for i in range(len(ws)):
        perms = weight_matching(reference, ws[i], spec=spec, max_iter=max_iter, seed=seed)
        out.append(permute(ws[i], perms))
    return WeightSpace.cat(out)


def nearest_distances(
    queries: torch.Tensor,
    pool: torch.Tensor,
    exclude_self: bool = False,
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance from each query vector to its nearest vector of ``pool``.

    Args:
        queries: ``[Q, D]`` flattened networks (already in a common frame, e.g. canonicalized).
        pool: ``[P, D]``.
        exclude_self: ``queries is pool``: skip the diagonal (nearest *other* network).
        groups: with ``exclude_self``, ``[P]`` ids (e.g. run ids); members of the same group are
            skipped too (checkpoints of one run are not independent networks).

    Returns:
        ``(distance [Q], index [Q])`` of the nearest pool vector.
    """
    if queries.dim() != 2 or pool.dim() != 2 or queries.shape[1] != pool.shape[1]:
        raise ValueError(
            f"expected [Q, D] and [P, D], got {tuple(queries.shape)} and {tuple(pool.shape)}"
        )
    d = torch.cdist(queries.double(), pool.double())
    if exclude_self:
        if queries.shape[0] != pool.shape[0]:
            raise ValueError("exclude_self needs queries and pool of the same networks")
        mask = torch.eye(len(pool), dtype=torch.bool)
        if groups is not None:
            mask |= groups[:, None] == groups[None, :]
        d = d.masked_fill(mask, float("inf"))
    dist, idx = d.min(dim=1)
    return dist.float(), idx
