"""The fused CSR multi-aggregation kernel (``_segment.c``): PNA's sum, min, max and std of every
segment in one pass over its rows, and their gradient in one more.

:func:`multi_aggregate` uses it under the "auto" backend for CPU float32/float64 messages
sorted by destination (a CSR ``ptr``), where the separate reductions of
:mod:`metanet.ops._kernels` each read the ``[E, F]`` messages again and allocate ``[E, F]``
temporaries (the gathered means of the std, the extreme masks of the backward). Results equal
the separate kernels' up to rounding; min/max ties send the gradient to the first extreme row,
like torch-scatter's ``segment_csr``. Without a C compiler, or with ``METANET_NO_NATIVE=1``,
:func:`available` is ``False`` and the separate kernels run.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from metanet import ckernels

SOURCE = Path(__file__).with_name("_segment.c")
DTYPES = {torch.float32: "f32", torch.float64: "f64"}
FUSED = frozenset(("sum", "mean", "min", "max", "std"))


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use), or ``None`` where it is unavailable."""
    lib = ckernels.load(SOURCE, "segment", "the scatter core uses separate PyTorch reductions")
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for suffix, real in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        fwd, bwd = getattr(lib, f"pna_forward_{suffix}"), getattr(lib, f"pna_backward_{suffix}")
        fwd.argtypes = [i64, i64, ptr, ptr, real, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
        bwd.argtypes = [i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
        fwd.restype = bwd.restype = None
    return lib


def available(x: Tensor, aggrs: tuple[str, ...]) -> bool:
    """Whether the fused kernel can reduce ``x`` for ``aggrs`` on this machine."""
    return (
        x.device.type == "cpu"
        and x.dtype in DTYPES
        and x.layout == torch.strided
        and FUSED.issuperset(aggrs)
        and library() is not None
    )


def _address(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _FusedAggregate(torch.autograd.Function):
    """``x [E, F]``, ``ptr [N+1]`` -> ``(sum, min, max, std)``, each ``[N, F]`` (a not requested
    reduction is an empty tensor)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, ptr: Tensor, count: Tensor, want_min: bool, want_max: bool,
        want_std: bool, eps: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        lib = library()
        x = x.contiguous()
        n, f = ptr.numel() - 1, x.size(1)
        suffix = DTYPES[x.dtype]
        total = x.new_empty(n, f)
        mn = x.new_empty(n, f) if want_min else None
        mx = x.new_empty(n, f) if want_max else None
        sd = x.new_empty(n, f) if want_std else None
        amin = torch.empty(n, f, dtype=torch.long) if want_min else None
        amax = torch.empty(n, f, dtype=torch.long) if want_max else None
        scratch = x.new_empty(f)  # held here: the kernel writes into it
        getattr(lib, f"pna_forward_{suffix}")(
            n, f, _address(ptr), _address(x), eps, _address(total), _address(mn), _address(mx),
            _address(sd), _address(amin), _address(amax), _address(scratch),
        )  # fmt: skip
        mean = inv = None
        if want_std:
            mean = total / count
            zero = sd == 0
            inv = (sd * count).reciprocal_().masked_fill_(zero, 0)  # 1 / (count * std)
        ctx.save_for_backward(x, ptr, mean, inv, amin, amax)
        ctx.set_materialize_grads(False)
        empty = x.new_empty(0)
        return total, *(empty if t is None else t for t in (mn, mx, sd))

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx, g_sum: Tensor | None, g_min: Tensor | None, g_max: Tensor | None,
        g_std: Tensor | None,
    ) -> tuple[Tensor | None, ...]:  # fmt: skip
        x, ptr, mean, inv, amin, amax = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        n, f = ptr.numel() - 1, x.size(1)
        g_sum = None if g_sum is None else g_sum.contiguous()
        g_min = None if g_min is None or amin is None else g_min.contiguous()
        g_max = None if g_max is None or amax is None else g_max.contiguous()
        g_std = None if g_std is None or inv is None else (g_std * inv).contiguous()
        gx = torch.empty_like(x)
        getattr(library(), f"pna_backward_{DTYPES[x.dtype]}")(
            n, f, _address(ptr), _address(x), _address(g_sum), _address(g_std),
            _address(mean if g_std is not None else None), _address(g_min), _address(amin),
            _address(g_max), _address(amax), _address(gx),
        )  # fmt: skip
        return gx, None, None, None, None, None, None


def aggregate(
    x: Tensor, ptr: Tensor, count: Tensor, aggrs: tuple[str, ...], eps: float
) -> dict[str, Tensor]:
    """The reductions ``aggrs`` (a subset of ``sum, mean, min, max, std``) of ``x [E, F]`` over
    the CSR segments ``ptr [N+1]`` (int64), with ``count [N, 1]`` the row counts clamped to
    >= 1; ``{name: [N, F]}``. Inputs must be valid (:func:`multi_aggregate` checks them)."""
    total, mn, mx, sd = _FusedAggregate.apply(
        x, ptr, count, "min" in aggrs, "max" in aggrs, "std" in aggrs, eps
    )  # fmt: skip
    out = {"sum": total, "mean": total / count}
    for name, value in (("min", mn), ("max", mx), ("std", sd)):
        if name in aggrs:
            out[name] = value
    return out
