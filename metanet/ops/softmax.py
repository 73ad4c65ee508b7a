"""Softmax within groups (attention over incoming edges), like torch_geometric.utils.softmax."""

from __future__ import annotations

from torch import Tensor

from metanet.ops.reduce import _check_dim, _check_index, _rows, reduce_2d


def scatter_softmax(
    src: Tensor, index: Tensor, dim: int = 0, dim_size: int | None = None
) -> Tensor:
    """Softmax of ``src`` over the slices along ``dim`` that share a group in ``index``.

    Args:
        src: ``[*, E, *]`` scores (floating point).
        index: ``[E]`` group of each slice, broadcast along the other dims.
        dim: the dimension of ``src`` holding the ``E`` slices.
        dim_size: number of groups (default ``index.max() + 1``).

    Returns:
        ``[*, E, *]``, same shape as ``src``; within each group the values sum to 1.
    """
    dim = _check_dim(src, dim)
    if not src.is_floating_point():
        raise TypeError(f"scatter_softmax needs a floating point src, got {src.dtype}")
    n = _check_index(index, src.size(dim), dim_size)
    index = index.long()
    x = _rows(src, dim)
    # softmax is shift invariant, so the group max needs no gradient
    shift = reduce_2d(x.detach(), index, None, n, "max").index_select(0, index)
    ex = (x - shift).exp()
    denom = reduce_2d(ex, index, None, n, "sum").index_select(0, index)
    return (ex / denom).reshape(src.movedim(dim, 0).shape).movedim(0, dim)
