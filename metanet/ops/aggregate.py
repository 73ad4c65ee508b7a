"""Multi-aggregation with PNA degree scalers (Corso et al., 2020), sharing work between aggrs.

``multi_aggregate`` computes several reductions of the same messages at once (the sum is
computed once and reused by mean and std; counts once for mean, std and the scalers) and
multiplies each by degree scalers. Under the "auto" backend, CPU messages sorted by destination
(a CSR ``ptr``) are reduced by one fused C kernel (:mod:`metanet.ops._fused`) where it is
available. Output layout, scaler-major like PyG's
``DegreeScalerAggregation``::

    out[:, (s * len(aggrs) + a) * F : (s * len(aggrs) + a + 1) * F] = scaler_s * aggr_a(src)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from metanet.ops import _fused
from metanet.ops import _kernels as K
from metanet.ops.backend import get_backend
from metanet.ops.reduce import (
    STD_EPS,
    _check_index,
    _check_ptr,
    check_segments,
    max_segment_length,
    reduce_2d,
    segment_counts,
    segment_divisor,
    std_from_mean,
)

AGGREGATIONS = ("sum", "mean", "max", "min", "std")
SCALERS = ("identity", "amplification", "attenuation", "linear", "inverse_linear")


def _check_names(names: Sequence[str], allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = (names,) if isinstance(names, str) else tuple(names)
    bad = [n for n in names if n not in allowed]
    if not names or bad:
        raise ValueError(f"{what} must be a non-empty subset of {allowed}, got {names}")
    return names


def multi_aggregate(
    src: Tensor,
    index: Tensor | None,
    dim_size: int,
    aggrs: Sequence[str] = AGGREGATIONS,
    scalers: Sequence[str] = ("identity",),
    ptr: Tensor | None = None,
    avg_log_degree: float | None = None,
    avg_degree: float | None = None,
) -> Tensor:
    """Several aggregations of messages ``src`` per destination, times PNA degree scalers.

    Args:
        src: ``[E, F]`` messages.
        index: ``[E]`` destination of each message (may be None when ``ptr`` is given).
        dim_size: number of destinations ``N``.
        aggrs: subset of ``("sum", "mean", "max", "min", "std")``.
        scalers: subset of ``("identity", "amplification", "attenuation", "linear",
            "inverse_linear")``; with ``d = max(deg, 1)``: amplification ``log(d+1)/avg_log``,
            attenuation ``avg_log/log(d+1)``, linear ``d/avg_deg``, inverse_linear ``avg_deg/d``.
        ptr: ``[N+1]`` CSR pointer when ``src`` is sorted by destination (faster kernels);
            then ``index`` must equal ``ptr_to_index(ptr)`` or be None.
        avg_log_degree: mean of ``log(deg+1)`` over the training graphs' nodes; default: this
            batch's value (detached).
        avg_degree: mean degree for the linear scalers; default: this batch's value.

    Returns:
        ``[N, len(scalers) * len(aggrs) * F]``; empty destinations give 0 for every aggr.
    """
    aggrs = _check_names(aggrs, AGGREGATIONS, "aggrs")
    scalers = _check_names(scalers, SCALERS, "scalers")
    if not isinstance(src, Tensor) or src.dim() != 2:
        raise ValueError(f"src must be [E, F], got {getattr(src, 'shape', type(src).__name__)}")
    if ptr is not None:
        _check_ptr(ptr, src.size(0))
        if ptr.numel() != dim_size + 1:
            raise ValueError(f"ptr has {ptr.numel()} entries but dim_size + 1 = {dim_size + 1}")
        ptr = ptr.long()
    elif index is None:
        raise ValueError("multi_aggregate needs index or ptr")
    if index is not None:
        _check_index(index, src.size(0), dim_size)
        index = index.long()

    count = segment_counts(index, ptr, dim_size)
    cnt = segment_divisor(index, ptr, dim_size, src.dtype)  # [N, 1], max(count, 1)
    results: dict[str, Tensor] = {}
    if ptr is not None and get_backend() == "auto" and _fused.available(src, aggrs):
        results = _fused.aggregate(src, ptr.contiguous(), cnt, aggrs, STD_EPS)
    elif {"sum", "mean", "std"} & set(aggrs):
        results["sum"] = reduce_2d(src, index, ptr, dim_size, "sum")
        results["mean"] = results["sum"] / cnt
    for op in ("max", "min"):
        if op in aggrs and op not in results:
            results[op] = reduce_2d(src, index, ptr, dim_size, op)
    if "std" in aggrs and "std" not in results:
        results["std"] = std_from_mean(src, results["mean"], index, ptr, cnt)
    return _combine(results, aggrs, scalers, count, cnt, avg_log_degree, avg_degree)


def _combine(
    results: dict[str, Tensor], aggrs: tuple[str, ...], scalers: tuple[str, ...], count: Tensor,
    cnt: Tensor, avg_log_degree: float | None, avg_degree: float | None,
) -> Tensor:  # fmt: skip
    """The aggregations in ``aggrs`` order times each degree scaler: ``[N, S*A*F]``."""
    out = torch.cat([results[a] for a in aggrs], dim=1)  # [N, A*F]
    if scalers == ("identity",):
        return out
    factors = _scalers(scalers, count, cnt, avg_log_degree, avg_degree)
    return torch.cat([out * f for f in factors], dim=1)


def film_multi_aggregate(
    scale: Tensor,
    shift: Tensor,
    sender_x: Tensor,
    receiver_x: Tensor,
    sender: Tensor,
    ptr: Tensor,
    rows: Tensor | None = None,
    aggrs: Sequence[str] = AGGREGATIONS,
    scalers: Sequence[str] = ("identity",),
    avg_log_degree: float | None = None,
    avg_degree: float | None = None,
) -> Tensor:
    """:func:`multi_aggregate` of edge-conditioned (FiLM) messages, without storing them.

    Row ``k`` of segment ``i`` (rows ``ptr[i]:ptr[i+1]``, one segment per receiving node) is
    the message ``scale[r] * (sender_x[sender[k]] + receiver_x[i]) + shift[r]`` with ``r =
    rows[k]`` (or ``k``): NG-GNN's and GMN's PNA message ``s(e) * (A h_j + B h_i) + t(e)``
    with ``sender_x = A h``, ``receiver_x = B h`` and ``scale, shift`` the edge's FiLM maps.
    ``rows`` reads edge-ordered ``scale/shift`` in another segment order, e.g. messages
    against the edge direction, segmented by source.

    Args:
        scale, shift: ``[E, F]`` per-edge FiLM factors (column slices of a wider tensor are
            read in place).
        sender_x: ``[M, F]`` per-sender features; ``receiver_x``: ``[N, F]`` per-segment ones.
        sender: ``[E]`` sender of each row (int64, in ``[0, M)``).
        ptr: ``[N+1]`` CSR pointer of the rows.
        rows: ``[E]`` permutation: row ``k`` reads ``scale/shift[rows[k]]`` (default identity).
        aggrs, scalers, avg_log_degree, avg_degree: as :func:`multi_aggregate`.

    Returns:
        ``[N, len(scalers) * len(aggrs) * F]``, equal to ``multi_aggregate`` of the explicit
        messages (one fused C pass under the "auto" backend on the CPU, else PyTorch ops).
    """
    aggrs = _check_names(aggrs, AGGREGATIONS, "aggrs")
    scalers = _check_names(scalers, SCALERS, "scalers")
    for name, t in (("scale", scale), ("shift", shift), ("sender_x", sender_x),
                    ("receiver_x", receiver_x)):  # fmt: skip
        if not isinstance(t, Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")  # fmt: skip
    e, f = scale.shape
    if shift.shape != scale.shape or sender_x.size(1) != f or receiver_x.size(1) != f:
        raise ValueError(f"scale {tuple(scale.shape)}, shift {tuple(shift.shape)}, sender_x "
                         f"{tuple(sender_x.shape)} and receiver_x {tuple(receiver_x.shape)} "
                         "must share the feature width")  # fmt: skip
    n = receiver_x.size(0)
    ptr, sender, rows = check_segments(ptr, e, (n, "receiver_x"), sender, sender_x.size(0), rows)
    count = segment_counts(None, ptr, n)
    cnt = segment_divisor(None, ptr, n, scale.dtype)
    if get_backend() == "auto" and _fused.available(scale, aggrs, shift, sender_x, receiver_x):
        max_degree = max_segment_length(ptr)
        results = _fused.film_aggregate(scale, shift, sender_x, receiver_x, sender, rows, ptr,
                                        cnt, max_degree, aggrs, STD_EPS)  # fmt: skip
        return _combine(results, aggrs, scalers, count, cnt, avg_log_degree, avg_degree)
    if rows is not None:
        scale, shift = scale.index_select(0, rows), shift.index_select(0, rows)
    receiver = K.ptr_to_index(ptr)
    m = sender_x.index_select(0, sender) + receiver_x.index_select(0, receiver)
    m = torch.addcmul(shift, scale, m)
    return multi_aggregate(m, receiver, n, aggrs, scalers, ptr, avg_log_degree, avg_degree)


def _scalers(
    names: tuple[str, ...], count: Tensor, deg: Tensor, avg_log: float | None, avg_lin: float | None
) -> list[Tensor | float]:
    """One ``[N, 1]`` factor (or 1.0) per scaler name; ``deg = max(count, 1)`` as ``[N, 1]``."""
    log_deg = (deg + 1).log()
    if avg_log is None:
        avg_log = float((count.to(deg.dtype) + 1).log().mean()) if count.numel() else 1.0
    if avg_lin is None:
        avg_lin = float(count.to(deg.dtype).mean()) if count.numel() else 1.0
    avg_log, avg_lin = avg_log or 1.0, avg_lin or 1.0  # all-isolated batch: avoid 0 division
    table = {
        "identity": 1.0,
        "amplification": log_deg / avg_log,
        "attenuation": avg_log / log_deg,
        "linear": deg / avg_lin,
        "inverse_linear": avg_lin / deg,
    }
    return [table[n] for n in names]


def degree_statistics(degree_histogram: Tensor) -> tuple[float, float]:
    """``(avg_log_degree, avg_degree)`` from a histogram ``hist[d] = #nodes of in-degree d``."""
    hist = degree_histogram.double()
    total = float(hist.sum())
    if total <= 0:
        raise ValueError("degree histogram is empty")
    d = torch.arange(hist.numel(), dtype=torch.float64)
    return float((hist * (d + 1).log()).sum()) / total, float((hist * d).sum()) / total


class MultiAggregation(nn.Module):
    r"""Module form of :func:`multi_aggregate` (PNA aggregators with degree scalers).

    Args:
        aggrs: reductions, subset of ``("sum", "mean", "max", "min", "std")``.
        scalers: degree scalers, subset of ``("identity", "amplification", "attenuation",
            "linear", "inverse_linear")``.
        avg_log_degree, avg_degree: training-set degree statistics (see
            :func:`degree_statistics`); default: each batch's own.

    Shapes:
        - **input:** messages :math:`(E, F)`, index :math:`(E)`, optional ptr :math:`(N+1)`
        - **output:** :math:`(N, |scalers| \cdot |aggrs| \cdot F)`
    """

    def __init__(
        self,
        aggrs: Sequence[str] = AGGREGATIONS,
        scalers: Sequence[str] = ("identity",),
        avg_log_degree: float | None = None,
        avg_degree: float | None = None,
    ) -> None:
        super().__init__()
        self.aggrs = _check_names(aggrs, AGGREGATIONS, "aggrs")
        self.scalers = _check_names(scalers, SCALERS, "scalers")
        self.avg_log_degree = avg_log_degree
        self.avg_degree = avg_degree

    @classmethod
    def from_degree_histogram(cls, degree_histogram: Tensor, **kwargs) -> MultiAggregation:
        """Build with the degree statistics of a training-set in-degree histogram."""
        avg_log, avg_lin = degree_statistics(degree_histogram)
        return cls(avg_log_degree=avg_log, avg_degree=avg_lin, **kwargs)

    def out_channels(self, in_channels: int) -> int:
        """Output width for messages of width ``in_channels``."""
        return len(self.scalers) * len(self.aggrs) * in_channels

    def forward(
        self,
        x: Tensor,
        index: Tensor | None,
        dim_size: int | None = None,
        ptr: Tensor | None = None,
    ) -> Tensor:
        """``x [E, F], index [E] (, ptr [N+1]) -> [N, |scalers| * |aggrs| * F]``."""
        if dim_size is None:
            if ptr is not None:
                dim_size = ptr.numel() - 1
            elif index is not None and index.numel():
                dim_size = int(index.max()) + 1
            else:
                dim_size = 0
        return multi_aggregate(
            x, index, dim_size, self.aggrs, self.scalers, ptr,
            self.avg_log_degree, self.avg_degree,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"aggrs={list(self.aggrs)}, scalers={list(self.scalers)}"


__all__ = [
    "AGGREGATIONS",
    "SCALERS",
    "MultiAggregation",
    "degree_statistics",
    "film_multi_aggregate",
    "multi_aggregate",
]
