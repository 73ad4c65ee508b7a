"""Baselines a weight generator has to beat on accuracy *and* novelty (Zeng et al., 2025).

Each takes the training checkpoints (flat ``[P, D]`` weights, aligned to one reference network
where the baseline mixes networks) and returns ``n`` new networks, with no training:

* :func:`checkpoint_baseline`: the training checkpoints themselves (memorization at its purest;
  their novelty is measured excluding each one's own entry);
* :func:`noise_baseline`: a random training checkpoint plus Gaussian noise, per layer scaled to
  ``scale`` times that layer's standard deviation across the zoo's entries;
* :func:`average_baseline`: the average of ``k`` random aligned training checkpoints;
* :func:`diagonal_gaussian_baseline`: a Gaussian with the per-parameter mean and standard
  deviation of the aligned zoo.

:func:`standard_baselines` returns all of them under their table names.
"""

from __future__ import annotations

import torch

from metanet.weightspace import WeightSpace, WeightSpaceSpec

__all__ = [
    "average_baseline",
    "checkpoint_baseline",
    "diagonal_gaussian_baseline",
    "noise_baseline",
    "standard_baselines",
]


def _check(train: torch.Tensor, n: int) -> None:
    if train.dim() != 2 or len(train) < 1:
        raise ValueError(f"training networks must be [P >= 1, D], got {tuple(train.shape)}")
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive integer, got {n!r}")


def _layer_scales(train: torch.Tensor, spec: WeightSpaceSpec) -> torch.Tensor:
    """``[D]``: each parameter's layer standard deviation (weights and biases separately)."""
    scales, start = [], 0
    for layer in spec.layers:
        sizes = [int(torch.Size(layer.weight_shape).numel())]
        if layer.has_bias:
            sizes.append(int(layer.weight_shape[0]))
        for size in sizes:
            block = train[:, start : start + size]
            s = block.std() if block.numel() > 1 else torch.tensor(0.0)
            scales.append(s.expand(size))
            start += size
    return torch.cat(scales)


def checkpoint_baseline(
    train: torch.Tensor, spec: WeightSpaceSpec
) -> tuple[WeightSpace, torch.Tensor]:
    """The training checkpoints as networks, with ``self_index`` ``[P]`` (each is itself)."""
    _check(train, 1)
    return WeightSpace.unflatten(train.clone(), spec), torch.arange(len(train))


def noise_baseline(
    train: torch.Tensor, spec: WeightSpaceSpec, n: int, scale: float, seed: int = 0
) -> tuple[WeightSpace, torch.Tensor]:
    """``n`` random training checkpoints with per-layer Gaussian noise of ``scale`` x the layer's
    weight standard deviation. Returns the networks and ``[n]`` the checkpoint each started from."""
    _check(train, n)
    if scale < 0:
        raise ValueError(f"noise scale must be >= 0, got {scale}")
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(len(train), (n,), generator=g)
    sigma = _layer_scales(train, spec) * scale
    noisy = train[src] + torch.randn(n, train.shape[1], generator=g) * sigma
    return WeightSpace.unflatten(noisy, spec), src


def average_baseline(
    aligned: torch.Tensor, spec: WeightSpaceSpec, n: int, k: int = 16, seed: int = 0
) -> WeightSpace:
    """``n`` averages of ``k`` distinct random checkpoints of the aligned zoo ``[P, D]``."""
    _check(aligned, n)
    if not 1 <= k <= len(aligned):
        raise ValueError(f"k must be in [1, {len(aligned)}] (the zoo's size), got {k}")
    g = torch.Generator().manual_seed(seed)
    picks = torch.stack([torch.randperm(len(aligned), generator=g)[:k] for _ in range(n)])
    return WeightSpace.unflatten(aligned[picks].mean(1), spec)


def diagonal_gaussian_baseline(
    aligned: torch.Tensor, spec: WeightSpaceSpec, n: int, seed: int = 0
) -> WeightSpace:
    """``n`` draws of a Gaussian with the per-parameter mean and standard deviation of the
    aligned zoo ``[P, D]`` (independent coordinates)."""
    _check(aligned, n)
    g = torch.Generator().manual_seed(seed)
    std = aligned.std(0) if len(aligned) > 1 else torch.zeros(aligned.shape[1])
    return WeightSpace.unflatten(
        aligned.mean(0) + torch.randn(n, aligned.shape[1], generator=g) * std, spec
    )


def standard_baselines(
    aligned: torch.Tensor,
    spec: WeightSpaceSpec,
    n: int,
    noise_scales: tuple[float, float] = (0.01, 0.1),
    k: int = 16,
    seed: int = 0,
) -> dict[str, tuple[WeightSpace, torch.Tensor | None]]:
    """The four baselines on the aligned zoo ``[P, D]``: ``name -> (networks, self_index)``
    (``self_index`` is set for the checkpoints themselves only)."""
    out: dict[str, tuple[WeightSpace, torch.Tensor | None]] = {}
    out["training checkpoints"] = checkpoint_baseline(aligned, spec)
    for s in noise_scales:
        out[f"checkpoint + noise {s:g}"] = (noise_baseline(aligned, spec, n, s, seed)[0], None)
    kk = min(k, len(aligned))
    out[f"average of {kk} aligned"] = (average_baseline(aligned, spec, n, kk, seed), None)
    out["diagonal Gaussian (aligned)"] = (diagonal_gaussian_baseline(aligned, spec, n, seed), None)
    return out
