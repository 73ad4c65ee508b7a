"""The fused CSR kernels of ``_segment.c`` as autograd functions: one C pass per segment (a
receiving node's rows) forward, one backward, under the "auto" backend for CPU float32/float64.

* :func:`aggregate` (``multi_aggregate``): PNA's sum, min, max and std of given messages, where
  the separate reductions of :mod:`metanet.ops._kernels` each read the ``[E, F]`` messages again
  and allocate ``[E, F]`` temporaries (the gathered means of the std, the extreme masks);
* :func:`film_aggregate` (``film_multi_aggregate``): the same of FiLM messages built in the
  kernel from node and edge terms, so that no ``[E, F]`` message, gather or product is stored;
* :func:`attention` (``relational_attention``): NG-T's edge-modulated attention, likewise.

Results equal the PyTorch path up to rounding; min/max ties send the gradient to the first
extreme row, like torch-scatter's ``segment_csr``. Without a C compiler, or with
``METANET_NO_NATIVE=1``, :func:`available` is ``False`` and the PyTorch path runs.
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
    film = [ptr, ptr, ptr, i64, ptr, i64, ptr, i64, ptr, i64]  # sender, rows, 4 strided inputs
    for suffix, real in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        kernels = {
            "pna_forward": [i64, i64, ptr, ptr, real, *[ptr] * 7],
            "pna_backward": [i64, i64, *[ptr] * 10],
            "film_pna_forward": [i64, i64, ptr, *film, real, *[ptr] * 7],
            "film_pna_backward": [i64, i64, ptr, *film, *[ptr] * 11, i64, ptr],
            "attention_forward": [i64, i64, i64, real, ctypes.c_int, *[ptr] * 4, i64, ptr, i64,
                                  ptr, i64, ptr],
            "attention_backward": [i64, i64, i64, real, ctypes.c_int, *[ptr] * 4, i64, ptr, i64,
                                   ptr, ptr, ptr, i64, ptr],
        }  # fmt: skip
        for name, argtypes in kernels.items():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes, fn.restype = argtypes, None
    return lib


def available(x: Tensor, aggrs: tuple[str, ...], *others: Tensor) -> bool:
    """Whether the fused kernels can reduce ``x`` (and its companions ``others``, of the same
    dtype) for ``aggrs`` on this machine."""
    return (
        x.device.type == "cpu"
        and x.dtype in DTYPES
        and all(t.layout == torch.strided for t in (x, *others))
        and all(t.dtype == x.dtype and t.device == x.device for t in others)
        and FUSED.issuperset(aggrs)
        and library() is not None
    )


def _rows_view(t: Tensor) -> Tensor:
    """``t`` with unit column stride (its row stride is passed to the kernel)."""
    return t if t.stride(-1) == 1 and t.stride(0) >= t.size(1) else t.contiguous()


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
        total, mn, mx, sd, amin, amax = _outputs(x, n, f, want_min, want_max, want_std)
        scratch = x.new_empty(f)  # held here: the kernel writes into it
        getattr(lib, f"pna_forward_{DTYPES[x.dtype]}")(
            n, f, _address(ptr), _address(x), eps, _address(total), _address(mn), _address(mx),
            _address(sd), _address(amin), _address(amax), _address(scratch),
        )  # fmt: skip
        mean, inv = _std_factors(total, sd, count)
        ctx.save_for_backward(x, ptr, mean, inv, amin, amax)
        return _returned(ctx, total, mn, mx, sd)

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
        g_sum, g_min, g_max, g_std = _backward_inputs(g_sum, g_min, g_max, g_std, amin, amax, inv)
        gx = torch.empty_like(x)
        getattr(library(), f"pna_backward_{DTYPES[x.dtype]}")(
            n, f, _address(ptr), _address(x), _address(g_sum), _address(g_std),
            _address(mean if g_std is not None else None), _address(g_min), _address(amin),
            _address(g_max), _address(amax), _address(gx),
        )  # fmt: skip
        return gx, None, None, None, None, None, None


def _outputs(x: Tensor, n: int, f: int, want_min: bool, want_max: bool, want_std: bool):
    """Fresh output buffers of one fused reduction: sum, min, max, std, argmin, argmax."""
    return (
        x.new_empty(n, f),
        x.new_empty(n, f) if want_min else None,
        x.new_empty(n, f) if want_max else None,
        x.new_empty(n, f) if want_std else None,
        torch.empty(n, f, dtype=torch.long) if want_min else None,
        torch.empty(n, f, dtype=torch.long) if want_max else None,
    )


def _std_factors(total: Tensor, sd: Tensor | None, count: Tensor):
    """The segment means and ``1 / (count * std)`` (0 where std is 0) the std's gradient uses."""
    if sd is None:
        return None, None
    inv = (sd * count).reciprocal_().masked_fill_(sd == 0, 0)
    return total / count, inv


def _returned(ctx, total: Tensor, *optional: Tensor | None) -> tuple[Tensor, ...]:
    """A fused forward's outputs ``(sum, min, max, std)``, empty tensors for those not
    requested (their gradients arrive as None: no zero-filled gradient buffers)."""
    ctx.set_materialize_grads(False)
    empty = total.new_empty(0)
    return total, *(empty if t is None else t for t in optional)


def _backward_inputs(g_sum, g_min, g_max, g_std, amin, amax, inv):
    """Contiguous output gradients, None where an output was not requested or not used."""
    return (
        None if g_sum is None else g_sum.contiguous(),
        None if g_min is None or amin is None else g_min.contiguous(),
        None if g_max is None or amax is None else g_max.contiguous(),
        None if g_std is None or inv is None else (g_std * inv).contiguous(),
    )


class _FilmAggregate(torch.autograd.Function):
    """FiLM messages ``scale[r] * (a[sender[k]] + b[i]) + shift[r]`` (``r = rows[k]``, or ``k``)
    of the CSR segments ``ptr``, reduced without being stored: ``(sum, min, max, std)``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, scale: Tensor, shift: Tensor, a: Tensor, b: Tensor, sender: Tensor,
        rows: Tensor | None, ptr: Tensor, count: Tensor, max_degree: int, want_min: bool,
        want_max: bool, want_std: bool, eps: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        scale, shift, a, b = (_rows_view(t) for t in (scale, shift, a, b))
        n, f = ptr.numel() - 1, scale.size(1)
        total, mn, mx, sd, amin, amax = _outputs(scale, n, f, want_min, want_max, want_std)
        scratch = scale.new_empty((max_degree + 1) * f)  # held here: the kernel writes into it
        getattr(library(), f"film_pna_forward_{DTYPES[scale.dtype]}")(
            n, f, _address(ptr), _address(sender), _address(rows),
            _address(scale), scale.stride(0), _address(shift), shift.stride(0),
            _address(a), a.stride(0), _address(b), b.stride(0), eps,
            _address(total), _address(mn), _address(mx), _address(sd), _address(amin),
            _address(amax), _address(scratch),
        )  # fmt: skip
        mean, inv = _std_factors(total, sd, count)
        ctx.save_for_backward(scale, shift, a, b, sender, rows, ptr, mean, inv, amin, amax)
        ctx.max_degree = max_degree
        return _returned(ctx, total, mn, mx, sd)

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx, g_sum: Tensor | None, g_min: Tensor | None, g_max: Tensor | None,
        g_std: Tensor | None,
    ) -> tuple[Tensor | None, ...]:  # fmt: skip
        scale, shift, a, b, sender, rows, ptr, mean, inv, amin, amax = ctx.saved_tensors
        n, f = ptr.numel() - 1, scale.size(1)
        g_sum, g_min, g_max, g_std = _backward_inputs(g_sum, g_min, g_max, g_std, amin, amax, inv)
        d_scale = scale.new_empty(scale.shape)
        d_shift = scale.new_empty(scale.shape)
        d_a, d_b = a.new_zeros(a.size(0), f), b.new_empty(n, f)
        scratch = scale.new_empty(3 * max(ctx.max_degree, 1) * f)
        getattr(library(), f"film_pna_backward_{DTYPES[scale.dtype]}")(
            n, f, _address(ptr), _address(sender), _address(rows),
            _address(scale), scale.stride(0), _address(shift), shift.stride(0),
            _address(a), a.stride(0), _address(b), b.stride(0),
            _address(g_sum), _address(g_std), _address(mean if g_std is not None else None),
            _address(g_min), _address(amin), _address(g_max), _address(amax),
            _address(d_scale), _address(d_shift), _address(d_a), _address(d_b),
            ctx.max_degree, _address(scratch),
        )  # fmt: skip
        return d_scale, d_shift, d_a, d_b, *(None,) * 9


def film_aggregate(
    scale: Tensor, shift: Tensor, a: Tensor, b: Tensor, sender: Tensor, rows: Tensor | None,
    ptr: Tensor, count: Tensor, max_degree: int, aggrs: tuple[str, ...], eps: float,
) -> dict[str, Tensor]:  # fmt: skip
    """The reductions ``aggrs`` of the FiLM messages of :class:`_FilmAggregate` over the CSR
    segments ``ptr``; ``{name: [N, F]}``. Inputs must be valid (the caller checks them)."""
    outs = _FilmAggregate.apply(
        scale, shift, a, b, sender, rows, ptr, count, max_degree, "min" in aggrs, "max" in aggrs,
        "std" in aggrs, eps,
    )  # fmt: skip
    return _named(outs, count, aggrs)


def _named(outs, count: Tensor, aggrs: tuple[str, ...]) -> dict[str, Tensor]:
    total, mn, mx, sd = outs
    out = {"sum": total, "mean": total / count}
    for name, value in (("min", mn), ("max", mx), ("std", sd)):
        if name in aggrs:
            out[name] = value
    return out


def aggregate(
    x: Tensor, ptr: Tensor, count: Tensor, aggrs: tuple[str, ...], eps: float
) -> dict[str, Tensor]:
    """The reductions ``aggrs`` (a subset of ``sum, mean, min, max, std``) of ``x [E, F]`` over
    the CSR segments ``ptr [N+1]`` (int64), with ``count [N, 1]`` the row counts clamped to
    >= 1; ``{name: [N, F]}``. Inputs must be valid (:func:`multi_aggregate` checks them)."""
    outs = _FusedAggregate.apply(x, ptr, count, "min" in aggrs, "max" in aggrs, "std" in aggrs, eps)
    return _named(outs, count, aggrs)


class _Attention(torch.autograd.Function):
    """Edge-modulated multi-head attention per CSR segment (:func:`metanet.ops.
    relational_attention`), with nothing per edge stored: the backward recomputes each
    segment's queries, keys, values and attention."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, node_qkv: Tensor, edge_qkv: Tensor, sender: Tensor, rows: Tensor | None,
        ptr: Tensor, heads: int, scale: float, max_degree: int,
    ) -> Tensor:  # fmt: skip
        node_qkv, edge_qkv = _rows_view(node_qkv), _rows_view(edge_qkv)
        n, f = ptr.numel() - 1, node_qkv.size(1) // 3
        modulate = int(edge_qkv.size(1) == 4 * f)
        out = node_qkv.new_empty(n, f)
        scratch = node_qkv.new_empty((3 * f + heads) * max(max_degree, 1))
        getattr(library(), f"attention_forward_{DTYPES[node_qkv.dtype]}")(
            n, f, heads, scale, modulate, _address(ptr), _address(sender), _address(rows),
            _address(node_qkv), node_qkv.stride(0), _address(edge_qkv), edge_qkv.stride(0),
            _address(out), max_degree, _address(scratch),
        )  # fmt: skip
        ctx.save_for_backward(node_qkv, edge_qkv, sender, rows, ptr)
        ctx.config = (heads, scale, max_degree, modulate)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        node_qkv, edge_qkv, sender, rows, ptr = ctx.saved_tensors
        heads, scale, max_degree, modulate = ctx.config
        n, f = ptr.numel() - 1, node_qkv.size(1) // 3
        d_node = node_qkv.new_zeros(node_qkv.shape)
        d_edge = edge_qkv.new_empty(edge_qkv.shape)
        scratch = node_qkv.new_empty((3 * f + 2 * heads) * max(max_degree, 1) + heads)
        g_out = g_out.contiguous()  # held here while the kernel reads it
        getattr(library(), f"attention_backward_{DTYPES[node_qkv.dtype]}")(
            n, f, heads, scale, modulate, _address(ptr), _address(sender), _address(rows),
            _address(node_qkv), node_qkv.stride(0), _address(edge_qkv), edge_qkv.stride(0),
            _address(g_out), _address(d_node), _address(d_edge), max_degree,
            _address(scratch),
        )  # fmt: skip
        return d_node, d_edge, None, None, None, None, None, None


def attention(
    node_qkv: Tensor, edge_qkv: Tensor, sender: Tensor, rows: Tensor | None, ptr: Tensor,
    heads: int, scale: float, max_degree: int,
) -> Tensor:  # fmt: skip
    """``[N, F]``: the fused form of :func:`metanet.ops.relational_attention` (inputs valid)."""
    return _Attention.apply(node_qkv, edge_qkv, sender, rows, ptr, heads, scale, max_degree)
