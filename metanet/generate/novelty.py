"""Novelty of generated networks as the weight-generation literature now measures it.

Accuracy alone cannot tell a generator from an interpolator: averaging a few training checkpoints,
or adding a little noise to one, also gives accurate networks (Zeng et al., 2025, "generative
models of weights memorize"). Two measures place each generated network relative to the
training networks:

* **error overlap** (:func:`max_error_overlap`): the set of test samples a network misclassifies
  (:func:`error_sets`), and the intersection-over-union of that set with the set of each training
  checkpoint (:func:`error_iou`); a network's score is its *maximum* IoU over the training
  checkpoints, excluding itself when it is one of them. A copy of a checkpoint scores 1;
  independently trained networks score well below (they make different mistakes);
* **aligned L2 nearest-neighbour distance** (:func:`aligned_nearest`): every network is first
  permuted into the frame of one reference network (Git Re-Basin weight matching,
  :func:`metanet.generate.canonicalize.canonicalize`), then its Euclidean distance to the nearest
  aligned training network is taken. Weight matching is a coordinate descent, not a canonical
  form: two permuted copies of one network can land in different local optima of the alignment
  to the reference. :func:`refined_nearest` therefore also aligns each network directly to its
  few nearest candidates and keeps the smallest distance found, so a permuted copy of a training
  network is at distance 0.

Networks of any module family (a generator of a :class:`~metanet.generate.data.FlatLayout`: CNNs
with BatchNorm, residual blocks, a user module): ``layout=`` and ``calibration=`` of
:func:`error_sets` and :func:`novelty` load every network through
:func:`metanet.generate.evaluate.load_network` (the layout's buffers, then BatchNorm running
statistics recomputed on the ``calibration`` batches); pass the same ``calibration`` for the
generated and the training networks, so a copy of a checkpoint makes the same errors. By
default a flat layout's L2 nearest-neighbour distance is *unaligned* (``NoveltyReport.aligned``
is ``False``). It is an upper bound on the aligned distance, so a near copy is still flagged,
but a permuted copy is far in L2 and shows only as an error IoU near 1. A chain with BatchNorm
(no residual blocks, no user module) can be aligned: with ``channels=``
(:class:`~metanet.generate.canonicalize.ChannelPermutations`) :func:`novelty` measures the
distance in the frame of a reference network, every network aligned to it with its BatchNorm
parameters moving along with its channels.

:func:`novelty` computes both for a batch (plus test accuracy and a "memorized" flag per network)
as a :class:`NoveltyReport`; :func:`plot_novelty` draws novelty against accuracy for several
methods (generators and the baselines of :mod:`metanet.generate.baselines`) into a PNG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from metanet.generate.canonicalize import canonicalize
from metanet.weightspace import WeightSpace

__all__ = [
    "NoveltyReport",
    "aligned_nearest",
    "align_to",
    "error_iou",
    "error_sets",
    "max_error_overlap",
    "novelty",
    "plot_novelty",
    "refined_nearest",
]


@torch.no_grad()
def error_sets(
    ws: WeightSpace,
    arch: Mapping[str, Any],
    x: torch.Tensor,
    y: torch.Tensor,
    layout: Any = None,
    calibration: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """``[B, N]`` boolean: which of the ``N`` samples each network of ``ws`` misclassifies.

    Every network is loaded into ``build_module(arch)`` by
    :func:`metanet.generate.evaluate.load_network`: through ``layout`` (a
    :class:`~metanet.generate.data.FlatLayout`; ``None``: ``ws`` is a weight space), then with
    its BatchNorm running statistics recomputed on the ``calibration`` batches when given. A
    network with non-finite outputs on a sample misclassifies it.
    """
    from metanet.generate.evaluate import load_network
    from metanet.zoo.architectures import build_module

    module = build_module(dict(arch)).eval()
    wrong = torch.ones(len(ws), len(y), dtype=torch.bool)
    for i in range(len(ws)):
        load_network(module, ws, i, layout, calibration)
        out = module(x)
        finite = torch.isfinite(out).all(1)
        wrong[i] = (out.argmax(1) != y) | ~finite
    return wrong


def error_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[A, B]`` intersection over union of the error sets ``a [A, N]`` and ``b [B, N]``.

    Two networks that both make no error at all have IoU 1 (the same, empty, set).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"error sets must be [A, N] and [B, N], got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    af, bf = a.float(), b.float()
    inter = af @ bf.T
    union = af.sum(1, keepdim=True) + bf.sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


def _self_mask(self_index: torch.Tensor | Sequence[int] | None, q: int, p: int) -> torch.Tensor:
    """``[q, p]`` mask of the pool entries each query must skip (itself, when it is in the pool)."""
    mask = torch.zeros(q, p, dtype=torch.bool)
    if self_index is None:
        return mask
    idx = torch.as_tensor(self_index, dtype=torch.long)
    if idx.shape != (q,):
        raise ValueError(f"self_index must have one entry per query ({q}), got {tuple(idx.shape)}")
    if bool(((idx >= p) | (idx < -1)).any()):
        raise ValueError(f"self_index entries must be -1 or a pool index below {p}")
    rows = (idx >= 0).nonzero().flatten()
    mask[rows, idx[rows]] = True
    return mask


def max_error_overlap(
    query_errors: torch.Tensor,
    train_errors: torch.Tensor,
    self_index: torch.Tensor | Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's maximum error-set IoU over the training networks (the error-overlap score).

    Args:
        query_errors: ``[Q, N]`` error sets of the generated (or baseline) networks.
        train_errors: ``[P, N]`` error sets of the training checkpoints.
        self_index: ``[Q]`` index of each query inside the training set, ``-1`` when it is not one
            of them; that entry is skipped (a checkpoint is not compared with itself).

    Returns:
        ``(iou [Q], index [Q])`` of the most overlapping training network.
    """
    iou = error_iou(query_errors, train_errors)
    iou = iou.masked_fill(_self_mask(self_index, len(iou), iou.shape[1]), -1.0)
    best, idx = iou.max(dim=1)
    return best, idx


def align_to(ws: WeightSpace, reference: WeightSpace, max_iter: int = 100) -> torch.Tensor:
    """``[B, D]`` flat weights of ``ws`` after aligning each network to ``reference`` (one
    network) with Git Re-Basin weight matching; networks with non-finite weights are left as they
    are (their distances come out non-finite)."""
    flat = ws.flatten().clone()
    finite = torch.isfinite(flat).all(1)
    if bool(finite.any()):
        rows = finite.nonzero().flatten()
        flat[rows] = canonicalize(ws[rows], reference, max_iter=max_iter).flatten()
    return flat


def aligned_nearest(
    queries: torch.Tensor,
    pool: torch.Tensor,
    self_index: torch.Tensor | Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance from each aligned query ``[Q, D]`` to its nearest aligned pool network
    ``[P, D]`` (both already in the reference frame, e.g. from :func:`align_to`), skipping
    ``self_index`` (as in :func:`max_error_overlap`). Returns ``(distance [Q], index [Q])``."""
    if queries.dim() != 2 or pool.dim() != 2 or queries.shape[1] != pool.shape[1]:
        raise ValueError(
            f"expected [Q, D] and [P, D], got {tuple(queries.shape)} and {tuple(pool.shape)}"
        )
    q = queries.double()
    finite = torch.isfinite(q).all(1)
    d = torch.cdist(torch.where(finite[:, None], q, 0.0), pool.double())
    d = d.masked_fill(~finite[:, None], math.inf)
    d = d.masked_fill(_self_mask(self_index, len(q), len(pool)), math.inf)
    dist, idx = d.min(dim=1)
    return dist.float(), idx


def refined_nearest(
    ws: WeightSpace,
    queries: torch.Tensor,
    pool: torch.Tensor,
    self_index: torch.Tensor | Sequence[int] | None = None,
    candidates: int = 3,
    max_iter: int = 100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest aligned pool network of each network of ``ws``, with the alignment refined.

    Starts from :func:`aligned_nearest` of ``queries`` (``ws`` aligned to the reference) in
    ``pool`` (aligned training networks); then aligns each network of ``ws`` directly to each of
    its ``candidates`` nearest pool networks (Git Re-Basin weight matching) and keeps the smallest
    distance (an upper bound on the distance minimized over all hidden-neuron permutations that is
    never above the reference-frame one). ``candidates=0``: the reference-frame distance only.
    Returns ``(distance [Q], index [Q])``.
    """
    from metanet.weightspace import permute, weight_matching

    dist, idx = aligned_nearest(queries, pool, self_index)
    if candidates <= 0 or len(pool) == 0:
        return dist, idx
    q = queries.double()
    d = torch.cdist(torch.nan_to_num(q, nan=0.0, posinf=0.0, neginf=0.0), pool.double())
    d = d.masked_fill(_self_mask(self_index, len(q), len(pool)), math.inf)
    top = d.topk(min(candidates, len(pool)), dim=1, largest=False).indices
    pool_ws = WeightSpace.unflatten(pool, ws.spec)
    dist, idx = dist.clone(), idx.clone()
    for i in range(len(ws)):
        if not torch.isfinite(dist[i]):
            continue
        one = ws[i]
        for j in top[i].tolist():
            if not math.isfinite(float(d[i, j])):
                continue
            perms = weight_matching(pool_ws[j], one, max_iter=max_iter)
            dj = float((permute(one, perms).flatten()[0].double() - pool[j].double()).norm())
            if dj < float(dist[i]):
                dist[i], idx[i] = dj, j
    return dist, idx


@dataclass
class NoveltyReport:
    """Accuracy and novelty of ``Q`` networks against one training set.

    Attributes:
        accuracy: ``[Q]`` test accuracy.
        iou: ``[Q]`` maximum error-set IoU over the training checkpoints (excluding self).
        iou_index: ``[Q]`` the training checkpoint it is reached at.
        distance: ``[Q]`` aligned L2 distance to the nearest training checkpoint (excluding self;
            :func:`refined_nearest`); for a flat layout, the unaligned distance (see ``aligned``).
        distance_index: ``[Q]`` that checkpoint.
        memorized: ``[Q]`` flagged as a copy: ``distance`` below ``copy_fraction`` times the
            training set's own median nearest-neighbour distance, or ``iou`` at least
            ``copy_iou``.
        scale: the training set's median aligned nearest-neighbour distance (the unit of
            ``copy_fraction``; unaligned for a flat layout).
        aligned: whether ``distance`` and ``scale`` were measured after permutation alignment
            (``False`` for a flat parameter layout, which has none).
    """

    accuracy: torch.Tensor
    iou: torch.Tensor
    iou_index: torch.Tensor
    distance: torch.Tensor
    distance_index: torch.Tensor
    memorized: torch.Tensor
    scale: float
    aligned: bool = True

    def summary(self) -> dict[str, float]:
        """Medians and means of the columns, the share of memorized networks, and
        ``l2_aligned`` (1.0 when the distances are aligned, 0.0 for a flat layout's)."""
        finite = torch.isfinite(self.distance)
        dist = self.distance[finite] if bool(finite.any()) else torch.tensor([math.inf])
        return {
            "acc_median": float(self.accuracy.median()),
            "acc_mean": float(self.accuracy.mean()),
            "iou_median": float(self.iou.median()),
            "iou_mean": float(self.iou.mean()),
            "l2_median": float(dist.median()),
            "l2_rel_median": float(dist.median()) / self.scale if self.scale > 0 else math.inf,
            "memorized": float(self.memorized.float().mean()),
            "l2_aligned": float(self.aligned),
        }


def novelty(
    ws: WeightSpace,
    train_aligned: torch.Tensor,
    train_errors: torch.Tensor,
    reference: WeightSpace | None,
    arch: Mapping[str, Any],
    x: torch.Tensor,
    y: torch.Tensor,
    self_index: torch.Tensor | Sequence[int] | None = None,
    aligned: torch.Tensor | None = None,
    copy_fraction: float = 0.5,
    copy_iou: float = 0.999,
    scale: float | None = None,
    candidates: int = 3,
    layout: Any = None,
    calibration: Sequence[torch.Tensor] | None = None,
    channels: Any = None,
) -> NoveltyReport:
    """Accuracy, error overlap and aligned L2 novelty of the networks ``ws``.

    Args:
        ws: ``Q`` networks (generated, a baseline, or the training checkpoints themselves).
        train_aligned: ``[P, D]`` training checkpoints aligned to ``reference`` (for a flat
            layout: their flat parameter vectors as they are).
        train_errors: ``[P, N]`` their error sets on ``(x, y)`` (:func:`error_sets`, with the
            same ``layout`` and ``calibration``).
        reference: the one network every side is aligned to (unused, may be ``None``, for a
            flat layout).
        arch: the architecture's arch dict.
        x, y: the test samples (inputs shaped for ``arch``).
        self_index: ``[Q]`` each network's index among the training checkpoints, ``-1`` if it
            is not one of them (skipped in both nearest-neighbour searches).
        aligned: ``[Q, D]`` ``ws`` already aligned to ``reference`` (skips the alignment).
        copy_fraction, copy_iou: the memorization thresholds (see :class:`NoveltyReport`).
        scale: the training set's median nearest-neighbour distance (computed when ``None``, in
            the reference frame).
        candidates: nearest candidates each network is aligned to directly
            (:func:`refined_nearest`; 0: the reference frame only).
        layout: the generator's :class:`~metanet.generate.data.FlatLayout` (``None``: ``ws`` is
            a weight space). With a layout nothing is aligned: the L2 distances are unaligned
            (``NoveltyReport.aligned`` is ``False``).
        calibration: input batches every network's BatchNorm running statistics are recomputed
            on before its errors are counted (:func:`error_sets`).
        channels: with a flat ``layout`` of a chain with BatchNorm, its
            :class:`~metanet.generate.canonicalize.ChannelPermutations`: the distances are then
            aligned (``NoveltyReport.aligned`` is ``True``). ``train_aligned`` must be the
            training vectors canonicalized to ``reference`` (a one-network WeightSpace of the
            layout's pseudo spec, e.g. a canonicalized generator's reference network); every
            network of ``ws`` is aligned to it too (:meth:`FlatLayout.canonicalize`) and keeps
            the smaller of its distances as given and after that alignment (a network already in
            the reference frame can land elsewhere when aligned again).
    """
    errors = error_sets(ws, arch, x, y, layout, calibration)
    accuracy = 1.0 - errors.float().mean(1)
    iou, iou_idx = max_error_overlap(errors, train_errors, self_index)
    if layout is not None:  # plain L2 between parameter vectors, or in the reference frame
        dist, dist_idx = aligned_nearest(ws.flatten(), train_aligned, self_index)
        if channels is not None:
            if reference is None or len(reference) != 1:
                raise ValueError("aligned novelty of flat-layout networks needs one reference")
            if aligned is None:
                aligned = layout.canonicalize(ws.flatten(), channels, reference.flatten()[0])
            again, again_idx = aligned_nearest(aligned, train_aligned, self_index)
            better = again < dist
            dist, dist_idx = torch.where(better, again, dist), torch.where(better, again_idx,
                                                                             dist_idx)
    else:
        if aligned is None:
            if reference is None:
                raise ValueError("novelty of weight-space networks needs a reference network")
            aligned = align_to(ws, reference)
        dist, dist_idx = refined_nearest(ws, aligned, train_aligned, self_index, candidates)
    if scale is None:
        own, _ = aligned_nearest(train_aligned, train_aligned, torch.arange(len(train_aligned)))
        scale = float(own.median())
    memorized = (dist < copy_fraction * scale) | (iou >= copy_iou)
    return NoveltyReport(accuracy, iou, iou_idx, dist, dist_idx, memorized, float(scale),
                         aligned=layout is None or channels is not None)  # fmt: skip


def plot_novelty(
    reports: Mapping[str, NoveltyReport],
    path: str,
    title: str = "",
    reference_l2: float | None = None,
) -> str:
    """Scatter of accuracy against novelty, one colour per method: max error IoU (left) and
    aligned L2 nearest-neighbour distance (right; labelled unaligned when any report is of a flat
    layout); medians as large markers. Written as a PNG to ``path`` (returned).
    ``reference_l2``: a vertical line (e.g. the distance between independent runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    colors = [*plt.get_cmap("tab10").colors, "black", "gold", "cyan", "magenta", "lime"]
    markers = "osD^v"
    for i, (name, rep) in enumerate(reports.items()):
        color = colors[i % len(colors)]
        marker = markers[(i // len(colors)) % len(markers)]
        acc = rep.accuracy.numpy()
        for ax, val in ((axes[0], rep.iou), (axes[1], rep.distance)):
            v = val.numpy()
            ok = torch.isfinite(val).numpy()
            ax.scatter(v[ok], acc[ok], s=9, alpha=0.35, color=color, linewidths=0)
            if ok.any():
                ax.scatter(
                    [float(val[torch.isfinite(val)].median())],
                    [float(rep.accuracy.median())],
                    s=90,
                    color=color,
                    marker=marker,
                    edgecolors="black",
                    label=name if ax is axes[0] else None,
                    zorder=3,
                )
    axes[0].set_xlabel("max IoU of misclassified test samples vs training checkpoints")
    unaligned = any(not rep.aligned for rep in reports.values())
    axes[1].set_xlabel(
        "unaligned L2 distance to nearest training checkpoint (flat layout: no alignment)"
        if unaligned
        else "aligned L2 distance to nearest training checkpoint"
    )
    axes[1].set_xscale("symlog", linthresh=0.1)
    if reference_l2 is not None:
        axes[1].axvline(reference_l2, color="gray", ls="--", lw=1)
    axes[0].set_ylabel("test accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.legend(loc="lower center", ncol=min(4, len(reports)), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(reports) - 1) // 4), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
