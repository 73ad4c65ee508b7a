"""Raw reduction kernels on 2-D inputs, one per backend path (see backend.AUTO_TABLE).

Every kernel reduces ``x [E, F]`` over rows into ``out [N, F]``, where row ``e`` goes to
segment ``index[e]`` (``index [E]`` int64) or, for the CSR kernels, rows
``ptr[i]:ptr[i+1]`` go to segment ``i`` (``ptr [N+1]``). Empty segments give 0. Inputs are
already validated by the public functions; all kernels are differentiable in ``x``.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from metanet.ops.backend import torch_scatter

SPMM_DTYPES = (torch.float32, torch.float64)


# Per-ptr cache: a graph batch's CSR pointer is reduced many times (every layer, every
# aggregator), so its validation, its index and its sparse matrix are built once. Entries are
# keyed by the ptr object, invalidated by in-place changes (tensor version counter) and
# dropped when the ptr is garbage-collected.
_PTR_CACHE: dict[int, dict] = {}


def ptr_cache(ptr: Tensor) -> dict:
    """The cache entry (a dict) of the CSR pointer ``ptr``; a fresh dict if it cannot be cached."""
    key = id(ptr)
    try:
        version = ptr._version
    except RuntimeError:  # inference-mode tensors have no version counter
        return {}
    entry = _PTR_CACHE.get(key)
    if entry is not None and entry["ref"]() is ptr and entry["version"] == version:
        return entry
    if entry is None or entry["ref"]() is not ptr:
        weakref.finalize(ptr, _PTR_CACHE.pop, key, None)
    entry = _PTR_CACHE[key] = {"ref": weakref.ref(ptr), "version": version}
    return entry


def ptr_to_index(ptr: Tensor) -> Tensor:
    """CSR pointer ``[N+1]`` -> sorted segment index ``[E]`` (``E = ptr[-1]``), cached."""
    entry = ptr_cache(ptr)
    if "index" not in entry:
        n = ptr.numel() - 1
        ids = torch.arange(n, device=ptr.device)
        e = int(ptr[-1]) if n > 0 else 0
        entry["index"] = ids.repeat_interleave(ptr.diff(), output_size=e)
    return entry["index"]


def _csr_matmul(x: Tensor, ptr: Tensor) -> Tensor:
    """``A @ x`` for the 0/1 segment matrix ``A [N, E]`` in CSR form (no autograd)."""
    n, e = ptr.numel() - 1, x.size(0)
    if e == 0 or n == 0:
        return x.new_zeros(n, x.size(1))
    entry = ptr_cache(ptr)
    key = ("csr", x.dtype, x.device)
    if key not in entry:  # ptr is copied so that the cached matrix does not keep ptr alive
        cols = torch.arange(e, device=x.device)
        entry[key] = torch.sparse_csr_tensor(
            ptr.clone(), cols, x.new_ones(e), size=(n, e), check_invariants=False
        )  # fmt: skip
    return entry[key] @ x


with warnings.catch_warnings():  # torch warns once that sparse CSR is "in beta"; do it here
    warnings.simplefilter("ignore")
    _csr_matmul(torch.ones(1, 1), torch.tensor([0, 1]))


def _needs_grad(x: Tensor) -> bool:
    return x.requires_grad and torch.is_grad_enabled()


class _CsrSum(torch.autograd.Function):
    """``out = A @ x`` with ``A [N, E]`` the 0/1 CSR matrix of the segments (MKL SpMM on CPU).

    The backward is ``grad_x = grad_out[index]``, an index_select, instead of torch's generic
    sparse backward (which builds A^T and is ~10x slower).
    """

    @staticmethod
    def forward(ctx, x: Tensor, ptr: Tensor, index: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(index)
        return _csr_matmul(x, ptr)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


def _scatter_extreme(x: Tensor, index: Tensor, n: int, op: str) -> Tensor:
    out = x.new_zeros(n, x.size(1))
    return out.scatter_reduce_(0, index.view(-1, 1).expand_as(x), x, op, include_self=False)


class _ScatterExtreme(torch.autograd.Function):
    """``scatter_reduce(amax|amin, include_self=False)`` with a leaner backward than torch's.

    Ties share the gradient equally (the same rule as torch's own ``scatter_reduce``).
    """

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, n: int, op: str) -> Tensor:  # type: ignore[override]
        out = _scatter_extreme(x, index, n, op)
        ctx.save_for_backward(x, index, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        x, index, out = ctx.saved_tensors
        hit = x == out.index_select(0, index)  # [E, F]: x is the extreme of its segment
        nonempty = int(torch.count_nonzero(torch.bincount(index, minlength=out.size(0))))
        if int(hit.sum()) > nonempty * out.size(1):  # ties: share the gradient
            ties = torch.zeros_like(out).index_add_(0, index, hit.to(grad.dtype))
            grad = grad / ties.clamp_min_(1)
        return grad.index_select(0, index).masked_fill_(~hit, 0), None, None, None


def sum_kernel(name: str, x: Tensor, index: Tensor | None, ptr: Tensor | None, n: int) -> Tensor:
    """Segment sums ``[N, F]`` with the kernel ``name``; ``index`` or ``ptr`` may be None."""
    if name == "spmm" and ptr is not None and x.dtype in SPMM_DTYPES and x.layout == torch.strided:
        if _needs_grad(x):
            return _CsrSum.apply(x, ptr, index if index is not None else ptr_to_index(ptr))
        return _csr_matmul(x, ptr)
    if name == "ts_segment" and ptr is not None:
        return torch_scatter.segment_csr(x, ptr, reduce="sum")
    if index is None:
        index = ptr_to_index(ptr)
    if name == "ts_scatter":
        return torch_scatter.scatter(x, index, 0, dim_size=n, reduce="sum")
    return x.new_zeros(n, x.size(1)).index_add_(0, index, x)  # "index_add" and fallbacks


def extreme_kernel(
    name: str, x: Tensor, index: Tensor | None, ptr: Tensor | None, n: int, op: str
) -> Tensor:
    """Segment maxima (``op="max"``) or minima (``op="min"``) ``[N, F]``; empty segments 0."""
    if name == "ts_segment" and ptr is not None:
        return torch_scatter.segment_csr(x, ptr, reduce=op)
    if name == "segment_reduce" and ptr is not None:
        out = torch.segment_reduce(x, op, offsets=ptr, axis=0)
        return out.masked_fill((ptr.diff() == 0).unsqueeze(1), 0)
    if index is None:
        index = ptr_to_index(ptr)
    if name == "ts_scatter":
        return torch_scatter.scatter(x, index, 0, dim_size=n, reduce=op)
    if _needs_grad(x):  # "scatter_reduce" and fallbacks
        return _ScatterExtreme.apply(x, index, n, "a" + op)
    return _scatter_extreme(x, index, n, "a" + op)


def prod_kernel(x: Tensor, index: Tensor, n: int) -> Tensor:
    """Segment products ``[N, F]`` (native on every backend); empty segments give 0."""
    out = x.new_zeros(n, x.size(1))
    return out.scatter_reduce(0, index.view(-1, 1).expand_as(x), x, "prod", include_self=False)
