"""The zoo builder's native kernels: fused forward/backward of many small ReLU chains in C.

``_chain.c`` (next to this file) trains MLPs and CNNs made of conv2d, linear, ReLU, dropout,
flatten and average-pool layers eight samples at a time, one per SIMD lane, with every layer's
bias, activation and dropout fused into one pass over the data: on 8x8 images with 1-8 channels
this is several times faster than the batched PyTorch ops of :mod:`metanet.zoo.batched`, whose
time goes to memory traffic and per-op overhead. It is compiled once per machine with the system C
compiler (``cc -O3``, AVX2/FMA where the CPU has them) into ``~/.cache/metanet/kernels`` (or
``$METANET_CACHE/kernels``) and loaded with :mod:`ctypes`. Without a compiler, or with
``METANET_NO_NATIVE=1``, :func:`library` returns ``None`` and the builder uses the PyTorch engine.

The kernels use float32 on the CPU; gradients equal the PyTorch engine's up to rounding (tested),
dropout masks come from a counter-based hash of (step seed, network, layer, sample, feature).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

SOURCE = Path(__file__).with_name("_chain.c")
OP_CODES = {"conv": 0, "linear": 1, "act": 2, "dropout": 3, "flatten": 4, "pool": 5}


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compile_flags() -> list[str]:
    flags = ["-O3", "-std=c11", "-ffp-contract=fast", "-funroll-loops", "-fPIC", "-shared"]
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= _cpu_flags():
        flags += ["-mavx2", "-mfma"]
    return flags


def _cache_dir() -> Path:
    root = os.environ.get("METANET_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "metanet"


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use), or ``None`` where they are unavailable (no C
    compiler, a failed compile, an unwritable cache folder: each with a warning naming why)."""
    if os.environ.get("METANET_NO_NATIVE", "") not in ("", "0"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not SOURCE.exists():
        return None
    flags = _compile_flags()
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    target = _cache_dir() / "kernels" / f"chain-{key}-{platform.machine()}.so"
    fallback = "the zoo builder uses PyTorch ops instead"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                out = Path(tmp) / target.name
                cmd = [compiler, *flags, str(SOURCE), "-o", str(out), "-lm"]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    warnings.warn(f"metanet: compiling {SOURCE} failed; {fallback}:\n"
                                  f"{done.stderr[-2000:]}", stacklevel=2)  # fmt: skip
                    return None
                os.replace(out, target)  # atomic: concurrent builders never load a partial file
        lib = ctypes.CDLL(str(target))
    except OSError as err:
        warnings.warn(f"metanet: the native zoo kernels at {target} are unavailable ({err}); "
                      f"{fallback}", stacklevel=2)  # fmt: skip
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
