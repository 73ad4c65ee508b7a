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
from metanet.ops.backend import get_backend
from metanet.ops.reduce import (
    STD_EPS,
    _check_index,
    _check_ptr,
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
    out = torch.cat([results[a] for a in aggrs], dim=1)  # [N, A*F]
    if scalers == ("identity",):
        return out
    factors = _scalers(scalers, count, cnt, avg_log_degree, avg_degree)
    return torch.cat([out * f for f in factors], dim=1)


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


__all__ = ["AGGREGATIONS", "SCALERS", "MultiAggregation", "degree_statistics", "multi_aggregate"]
