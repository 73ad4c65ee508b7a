"""The zoo builder's native kernels: fused forward/backward of many small ReLU chains in C.

``_chain.c`` (next to this file) trains MLPs and CNNs made of conv2d, linear, ReLU, dropout,
flatten and average-pool layers eight samples at a time, one per SIMD lane, with every layer's
bias, activation and dropout fused into one pass over the data: on 8x8 images with 1-8 channels
this is several times faster than the batched PyTorch ops of :mod:`metanet.zoo.batched`, whose
time goes to memory traffic and per-op overhead. It is compiled once per machine and loaded by
:mod:`metanet.ckernels`. Without a compiler, or with ``METANET_NO_NATIVE=1``, :func:`library`
returns ``None`` and the builder uses the PyTorch engine.

The kernels use float32 on the CPU; gradients equal the PyTorch engine's up to rounding (tested),
dropout masks come from a counter-based hash of (step seed, network, layer, sample, feature).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Any

import torch

from metanet import ckernels

SOURCE = Path(__file__).with_name("_chain.c")
OP_CODES = {"conv": 0, "linear": 1, "act": 2, "dropout": 3, "flatten": 4, "pool": 5}


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use), or ``None`` where they are unavailable (no C
    compiler, a failed compile, an unwritable cache folder: each with a warning naming why)."""
    lib = ckernels.load(SOURCE, "chain", "the zoo builder uses PyTorch ops instead")
    if lib is None:
        return None
    c_int, c_ptr = ctypes.c_int, ctypes.c_void_p
    lib.chain_ce_grad.argtypes = [c_int, c_ptr, c_int, c_int, c_int, c_ptr, c_ptr, c_ptr, c_ptr,
                                  c_ptr, c_ptr, c_ptr, c_ptr]  # fmt: skip
    lib.chain_forward.argtypes = [c_int, c_ptr, c_int, c_int, c_int, c_ptr, c_ptr, c_ptr]
    lib.chain_ce_grad.restype = lib.chain_forward.restype = c_int
    return lib


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


class NativeChain:
    """The ops of a :class:`metanet.zoo.batched.BatchedNet` ReLU chain as the C kernels'
    descriptor; :meth:`ce_grad` and :meth:`forward` take raw inputs flattened in PyTorch's
    (C, H, W) order."""

    def __init__(self, net: Any) -> None:
        if not net.manual:
            raise ValueError("the native kernels run ReLU chains only")
        rows = []
        for op, ((c, h, w), out) in zip(net.ops, net.op_shapes()):
            if op.kind == "conv":
                b = op.band
                extra = (b.k, b.s, b.pad, net.offsets[2 * op.index], net.offsets[2 * op.index + 1])
            elif op.kind == "linear":
                extra = (1, 1, 0, net.offsets[2 * op.index], net.offsets[2 * op.index + 1])
            else:  # relu, dropout, pool, flatten
                extra = (1, 1, 0, 0, 0)
            rows.append([OP_CODES[op.kind], c, h, w, *out, *extra])
            chw = out
        self.desc = torch.tensor(rows, dtype=torch.int32).contiguous()
        self.n_ops = len(rows)
        self.dim = net.dim
        self.in_features = rows[0][1] * rows[0][2] * rows[0][3]
        self.classes = chw[0]

    def ce_grad(self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
                rate: torch.Tensor | None,
                keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient ``[M, D]`` and loss ``[M]`` of each network's weighted cross-entropy
        ``sum_b w[m, b] * CE(net_m(x[m, b]), y[m, b])``: ``x`` ``[M, B, F]``, ``y``/``w``
        ``[M, B]``, dropout ``rate`` ``[M]`` (or ``None``) with each row's mask key ``keys``
        ``[M]`` (:func:`metanet.zoo.schedule.dropout_keys`; the masks are
        :func:`metanet.zoo.schedule.dropout_multipliers`)."""
        lib = library()
        assert lib is not None
        m, b = y.shape
        flat = flat.detach().float().contiguous()
        x = x.float().reshape(m, b, self.in_features).contiguous()
        y = y.long().contiguous()
        w = w.float().contiguous()
        r = rate.float().contiguous() if rate is not None else None
        k = keys.long().contiguous() if rate is not None and keys is not None else None
        grad = torch.empty(m, self.dim)
        loss = torch.empty(m)
        err = lib.chain_ce_grad(self.n_ops, _ptr(self.desc), m, b, self.dim, _ptr(flat), _ptr(x),
                                _ptr(y), _ptr(w), _ptr(r) if r is not None else None,
                                _ptr(k) if k is not None else None, _ptr(grad),
                                _ptr(loss))  # fmt: skip
        if err:
            raise MemoryError("chain_ce_grad: out of memory")
        return grad, loss

    def forward(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Evaluation logits ``[M, S, C]`` of the networks ``flat`` ``[M, D]`` on shared inputs
        ``x`` ``[S, ...]`` (no dropout)."""
        lib = library()
        assert lib is not None
        flat = flat.detach().float().contiguous()
        x = x.float().reshape(x.shape[0], -1).contiguous()
        out = torch.empty(flat.shape[0], x.shape[0], self.classes)
        err = lib.chain_forward(self.n_ops, _ptr(self.desc), flat.shape[0], x.shape[0], self.dim,
                                _ptr(flat), _ptr(x), _ptr(out))  # fmt: skip
        if err:
            raise MemoryError("chain_forward: out of memory")
        return out
