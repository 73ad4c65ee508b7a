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
    """``out = A @ x`` (divided by ``divisor [N, 1]`` if given: the mean) with ``A [N, E]`` the
    0/1 CSR matrix of the segments (MKL SpMM on CPU).

    The backward is ``grad_x = (grad_out / divisor)[index]``, one index_select, instead of
    torch's generic sparse backward (which builds A^T and is ~10x slower).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, ptr: Tensor, index: Tensor, divisor: Tensor | None
    ) -> Tensor:
        ctx.save_for_backward(index, divisor)
        out = _csr_matmul(x, ptr)
        return out if divisor is None else out.div_(divisor)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        index, divisor = ctx.saved_tensors
        if divisor is not None:
            grad = grad / divisor
        return grad.index_select(0, index), None, None, None


def _scatter_extreme(
    x: Tensor, index: Tensor, n: int, op: str, expanded: Tensor | None = None
) -> Tensor:
    if expanded is None:
        expanded = index.view(-1, 1).expand_as(x)
    return x.new_zeros(n, x.size(1)).scatter_reduce_(0, expanded, x, op, include_self=False)


def expanded_index(ptr: Tensor, width: int) -> Tensor:
    """``ptr_to_index(ptr)`` as an ``[E, width]`` expanded view (for scatter_reduce), cached."""
    entry = ptr_cache(ptr)
    key = ("expanded", width)
    if key not in entry:
        entry[key] = ptr_to_index(ptr).view(-1, 1).expand(-1, width)
    return entry[key]


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


def sum_kernel(
    name: str,
    x: Tensor,
    index: Tensor | None,
    ptr: Tensor | None,
    n: int,
    divisor: Tensor | None = None,
) -> Tensor:
    """Segment sums ``[N, F]`` with the kernel ``name``, divided by ``divisor [N, 1]`` if given
    (segment means); ``index`` or ``ptr`` may be None."""
    grad = _needs_grad(x)
    if name == "spmm" and ptr is not None and x.dtype in SPMM_DTYPES and x.layout == torch.strided:
        if grad:
            index = index if index is not None else ptr_to_index(ptr)
            return _CsrSum.apply(x, ptr, index, divisor)
        out = _csr_matmul(x, ptr)
    elif name == "ts_segment" and ptr is not None:
        out = torch_scatter.segment_csr(x, ptr, reduce="sum")
    else:
        if index is None:
            index = ptr_to_index(ptr)
        if name == "ts_scatter":
            out = torch_scatter.scatter(x, index, 0, dim_size=n, reduce="sum")
        else:  # "index_add" and fallbacks
            out = x.new_zeros(n, x.size(1)).index_add_(0, index, x)
    if divisor is None:
        return out
    if grad or not out.is_floating_point():  # integer sums: true division gives floats
        return out / divisor
    return out.div_(divisor)


class _Std(torch.autograd.Function):
    """Population std per segment from the (precomputed, detached) segment means.

    Forward is two-pass (stable): ``var = sum((x - mean[seg])^2) / count``; variances at or
    below ``eps`` give 0. Backward uses the closed form ``d std / d x_e = (x_e - mean) /
    (count * std)`` (the mean's own dependence on ``x`` contributes exactly 0), i.e. one
    gather and one multiply instead of differentiating through the two passes.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, mean: Tensor, index: Tensor, count: Tensor, sum_fn, eps: float
    ) -> Tensor:
        diff = mean.index_select(0, index)
        diff = torch.sub(x, diff, out=diff)  # [E, F], reusing the gathered buffer
        grad = ctx.needs_input_grad[0]
        var = sum_fn(diff.square() if grad else diff.square_()).div_(count)  # [N, F]
        zero = var <= eps
        std = var.sqrt_().masked_fill_(zero, 0)
        if grad:
            inv = (std * count).reciprocal_().masked_fill_(zero, 0)  # 1 / (count * std)
            ctx.save_for_backward(diff, index, inv)
        return std

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        diff, index, inv = ctx.saved_tensors
        return (grad * inv).index_select(0, index).mul_(diff), None, None, None, None, None


def std_kernel(x: Tensor, mean: Tensor, index: Tensor, count: Tensor, sum_fn, eps: float) -> Tensor:
    """Segment std ``[N, F]`` of ``x [E, F]`` given segment means ``[N, F]``, the segment of each
    row ``index [E]``, row counts ``[N, 1]`` (>= 1) and ``sum_fn`` (``[E, F] -> [N, F]``)."""
    return _Std.apply(x, mean.detach(), index, count, sum_fn, eps)


def extreme_kernel(
    name: str, x: Tensor, index: Tensor | None, ptr: Tensor | None, n: int, op: str
) -> Tensor:
    """Segment maxima (``op="max"``) or minima (``op="min"``) ``[N, F]``; empty segments 0."""
    if name == "ts_segment" and ptr is not None:
        return torch_scatter.segment_csr(x, ptr, reduce=op)
    if name == "segment_reduce" and ptr is not None:
        out = torch.segment_reduce(x, op, offsets=ptr, axis=0)
        return out.masked_fill((ptr.diff() == 0).unsqueeze(1), 0)
    grad = _needs_grad(x)
    if not grad and ptr is not None and name != "ts_scatter":  # scatter_reduce on CSR rows
        return _scatter_extreme(x, None, n, "a" + op, expanded_index(ptr, x.size(1)))
    if index is None:
        index = ptr_to_index(ptr)
    if name == "ts_scatter":
        return torch_scatter.scatter(x, index, 0, dim_size=n, reduce=op)
    if grad:  # "scatter_reduce" and fallbacks
        return _ScatterExtreme.apply(x, index, n, "a" + op)
    return _scatter_extreme(x, index, n, "a" + op)


def prod_kernel(x: Tensor, index: Tensor, n: int) -> Tensor:
    """Segment products ``[N, F]`` (native on every backend); empty segments give 0."""
    out = x.new_zeros(n, x.size(1))
    return out.scatter_reduce(0, index.view(-1, 1).expand_as(x), x, "prod", include_self=False)
