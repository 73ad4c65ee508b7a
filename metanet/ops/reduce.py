"""``scatter`` (any index order) and ``segment`` (CSR) reductions, like torch_geometric.utils.

Reductions: ``sum``, ``mean``, ``max``, ``min``, ``std`` (population std, two-pass) and
``mul``. Empty segments give 0 for every reduction. All are differentiable in ``src``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from metanet.ops import _kernels as K
from metanet.ops.backend import kernel_for

REDUCTIONS = ("sum", "mean", "max", "min", "std", "mul")
HIGH_DEGREE = 128  # mean rows per segment from which "csr_high_degree" kernels are used
STD_EPS = 1e-12  # variances at or below this give std 0 (and gradient 0), avoiding sqrt'(0)


def _check_reduce(reduce: str) -> None:
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduce {reduce!r}; choose one of {REDUCTIONS}")


def _check_index(index: Tensor, length: int, dim_size: int | None) -> int:
    """Validate a 1-D integer index of ``length`` entries; returns the output size."""
    if not isinstance(index, Tensor) or index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"index must be an int64/int32 tensor, got {type(index).__name__}"
                        f"{'' if not isinstance(index, Tensor) else ' of ' + str(index.dtype)}")
    if index.dim() != 1 or index.numel() != length:
        raise ValueError(f"index must be 1-D with {length} entries (src.size(dim)), "
                         f"got shape {tuple(index.shape)}")
    if index.numel() == 0:
        return 0 if dim_size is None else dim_size
    lo, hi = (int(v) for v in torch.aminmax(index))
    size = hi + 1 if dim_size is None else dim_size
    if lo < 0 or hi >= size:
        raise ValueError(f"index out of range: values in [{lo}, {hi}] but dim_size is {size}")
    return size


def _check_ptr(ptr: Tensor, length: int) -> None:
    """Validate a CSR pointer: 1-D int, ``ptr[0] == 0``, non-decreasing, ``ptr[-1] == length``."""
    if not isinstance(ptr, Tensor) or ptr.dtype not in (torch.int64, torch.int32):
        raise TypeError("ptr must be an int64/int32 tensor")
    entry = K.ptr_cache(ptr)
    if entry.get("valid_for") == length:  # checked before and not modified since
        return
    if ptr.dim() != 1 or ptr.numel() == 0:
        raise ValueError(f"ptr must be 1-D with num_segments + 1 entries, got {tuple(ptr.shape)}")
    first, last = int(ptr[0]), int(ptr[-1])
    if first != 0 or last != length:
        raise ValueError(f"ptr must start at 0 and end at src.size(0) = {length}, "
                         f"got {first} .. {last}")
    if ptr.numel() > 1 and bool((ptr.diff() < 0).any()):
        raise ValueError("ptr must be non-decreasing (a CSR pointer of destination-sorted rows)")
    entry["valid_for"] = length


def reduce_2d(
    x: Tensor, index: Tensor | None, ptr: Tensor | None, n: int, reduce: str
) -> Tensor:
    """Reduce rows of ``x [E, F]`` into ``[n, F]`` by ``index [E]`` and/or CSR ``ptr [n+1]``.

    Inputs must be valid (the public functions check them). With ``ptr`` the CSR kernels of
    the active backend are used; ``index`` (if also given) saves recomputing it from ``ptr``.
    """
    layout = layout_of(x, ptr)
    if reduce in ("max", "min"):
        kernel = kernel_for("max", layout, x.requires_grad and torch.is_grad_enabled())
        return K.extreme_kernel(kernel, x, index, ptr, n, reduce)
    if reduce == "mul":
        return K.prod_kernel(x, K.ptr_to_index(ptr) if index is None else index, n)
    kernel = kernel_for("sum", layout)
    if reduce == "sum":
        return K.sum_kernel(kernel, x, index, ptr, n)
    count = segment_divisor(index, ptr, n, x.dtype)  # [n, 1]
    if reduce == "mean":
        return K.sum_kernel(kernel, x, index, ptr, n, divisor=count)
    mean = K.sum_kernel(kernel, x.detach(), index, ptr, n, divisor=count)
    return std_from_mean(x, mean, index, ptr, count)


def layout_of(x: Tensor, ptr: Tensor | None) -> str:
    """Key into the backend tables: "index", "csr", or "csr_high_degree" (mean degree >= 128)."""
    if ptr is None:
        return "index"
    return "csr_high_degree" if x.size(0) >= HIGH_DEGREE * (ptr.numel() - 1) else "csr"


def std_from_mean(
    x: Tensor, mean: Tensor, index: Tensor | None, ptr: Tensor | None, count: Tensor
) -> Tensor:
    """Population std ``[n, F]`` given the segment means ``[n, F]`` (two-pass, stable) and the
    row counts ``count [n, 1]`` (clamped to >= 1). Differentiable in ``x`` only (the gradient
    through the mean is exactly 0); variances ``<= STD_EPS`` give std 0 and gradient 0.
    """
    n = mean.size(0)
    gather = index if index is not None else K.ptr_to_index(ptr)
    return K.std_kernel(
        x, mean, gather, count, lambda t: reduce_2d(t, index, ptr, n, "sum"), STD_EPS
    )  # fmt: skip


def segment_counts(index: Tensor | None, ptr: Tensor | None, n: int) -> Tensor:
    """Number of rows per segment ``[n]`` (int64)."""
    if ptr is not None:
        return ptr.diff().long()
    return torch.bincount(index, minlength=n)


def check_segments(
    ptr: Tensor, rows: int, receivers: tuple[int, str], sender: Tensor, senders: int,
    order: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Validate the segment structure of a fused message op: CSR ``ptr`` over ``rows`` rows
    with one segment per receiver (``receivers = (count, what holds them)`` for the error),
    ``sender [rows]`` in ``[0, senders)`` and an optional row order ``order [rows]``; returns
    them as contiguous int64."""
    _check_ptr(ptr, rows)
    if ptr.numel() != receivers[0] + 1:
        raise ValueError(f"ptr has {ptr.numel()} entries but {receivers[1]} has "
                         f"{receivers[0]} rows")  # fmt: skip
    _check_index(sender, rows, senders)
    if order is not None:
        _check_index(order, rows, rows)
        order = order.long().contiguous()
    return ptr.long().contiguous(), sender.long().contiguous(), order


def max_segment_length(ptr: Tensor) -> int:
    """The most rows of any segment of the CSR pointer ``ptr`` (0 for none); cached per pointer,
    as every layer of a graph model asks for it again (one host sync per batch)."""
    entry = K.ptr_cache(ptr)
    if "max_length" not in entry:
        entry["max_length"] = int(ptr.diff().max()) if ptr.numel() > 1 else 0
    return entry["max_length"]


def segment_divisor(index: Tensor | None, ptr: Tensor | None, n: int, dtype: torch.dtype) -> Tensor:
    """Row counts clamped to >= 1 as ``[n, 1]`` of ``dtype`` (the divisor of means); cached per
    CSR pointer (do not modify the result in place)."""
    if ptr is None:
        return torch.bincount(index, minlength=n).to(dtype).clamp_min_(1).unsqueeze(1)
    entry = K.ptr_cache(ptr)
    key = ("divisor", dtype)
    if key not in entry:
        entry[key] = ptr.diff().to(dtype).clamp_min_(1).unsqueeze(1)
    return entry[key]


def scatter(
    src: Tensor, index: Tensor, dim: int = 0, dim_size: int | None = None, reduce: str = "sum"
) -> Tensor:
    """Reduce slices of ``src`` along ``dim`` into groups given by ``index``.

    Args:
        src: ``[*, E, *]`` values; ``E = src.size(dim)``.
        index: ``[E]`` group of each slice (any order), broadcast along the other dims.
        dim: the dimension of ``src`` that is reduced.
        dim_size: number of groups ``N`` (default ``index.max() + 1``).
        reduce: ``"sum" | "mean" | "max" | "min" | "std" | "mul"``.

    Returns:
        ``[*, N, *]``: ``src`` with dimension ``dim`` replaced by the groups; 0 for empty groups.
    """
    _check_reduce(reduce)
    dim = _check_dim(src, dim)
    n = _check_index(index, src.size(dim), dim_size)
    index = index if index.dtype == torch.int64 else index.long()
    if src.dim() == 2 and dim == 0:
        return reduce_2d(src, index, None, n, reduce)
    return _unrows(reduce_2d(_rows(src, dim), index, None, n, reduce), src, dim)


def segment(src: Tensor, ptr: Tensor, reduce: str = "sum") -> Tensor:
    """Reduce consecutive row blocks of ``src`` (CSR layout, along dim 0).

    Args:
        src: ``[E, *]`` rows sorted by segment.
        ptr: ``[N+1]`` CSR pointer: rows ``ptr[i]:ptr[i+1]`` form segment ``i``.
        reduce: ``"sum" | "mean" | "max" | "min" | "std" | "mul"``.

    Returns:
        ``[N, *]``; 0 for empty segments.
    """
    if reduce not in REDUCTIONS:
        _check_reduce(reduce)
    if not isinstance(src, Tensor) or src.dim() == 0:
        _check_dim(src, 0)  # raises for a non-tensor
        raise ValueError("src must have at least one dimension (the segmented rows)")
    _check_ptr(ptr, src.size(0))
    if ptr.dtype != torch.int64:
        ptr = ptr.long()
    if src.dim() == 2:  # the common case: no reshaping
        return reduce_2d(src, None, ptr, ptr.numel() - 1, reduce)
    return _unrows(reduce_2d(_rows(src, 0), None, ptr, ptr.numel() - 1, reduce), src, 0)


def index_to_ptr(sorted_index: Tensor, size: int) -> Tensor:
    """CSR pointer ``[size+1]`` of a sorted index ``[E]`` with values in ``[0, size)``."""
    _check_index(sorted_index, sorted_index.numel(), size)
    if sorted_index.numel() > 1 and bool((sorted_index.diff() < 0).any()):
        raise ValueError("index_to_ptr needs a sorted (non-decreasing) index")
    ptr = sorted_index.new_zeros(size + 1, dtype=torch.long)
    torch.cumsum(torch.bincount(sorted_index, minlength=size), 0, out=ptr[1:])
    return ptr


def ptr_to_index(ptr: Tensor) -> Tensor:
    """Sorted segment index ``[E]`` of a CSR pointer ``[N+1]``."""
    _check_ptr(ptr, int(ptr[-1]) if isinstance(ptr, Tensor) and ptr.numel() else 0)
    return K.ptr_to_index(ptr.long())


def _check_dim(src: Tensor, dim: int) -> int:
    if not isinstance(src, Tensor):
        raise TypeError(f"src must be a tensor, got {type(src).__name__}")
    if not -src.dim() <= dim < max(src.dim(), 1):
        raise ValueError(f"dim {dim} out of range for src of shape {tuple(src.shape)}")
    return dim % max(src.dim(), 1)


def _rows(src: Tensor, dim: int) -> Tensor:
    """``src`` as ``[E, F]`` with the reduced dim first (a view when ``dim == 0``)."""
    if src.dim() == 0:
        raise ValueError("src must have at least one dimension")
    x = src.movedim(dim, 0)
    return x.reshape(x.size(0), x[0].numel() if x.size(0) else math.prod(x.shape[1:]))


def _unrows(out: Tensor, src: Tensor, dim: int) -> Tensor:
    """Inverse of :func:`_rows`: ``[N, F]`` -> ``src`` shape with ``size(dim) = N``."""
    rest = src.movedim(dim, 0).shape[1:]
    return out.reshape(out.size(0), *rest).movedim(0, dim)
