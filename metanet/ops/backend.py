"""Backend selection for the scatter core: native torch, torch-scatter, or "auto".

``auto`` (the default) picks, per reduction and layout, the kernel that was fastest when
measured on the reference machine (2-core CPU, torch 2.13, torch-scatter 2.1.2) with
``scripts/bench_scatter.py``; see :data:`AUTO_TABLE`. ``native`` uses only torch operators;
``torch_scatter`` uses the torch-scatter kernels wherever it has one.

The backend is chosen, in order of precedence, by :func:`use_backend` (a context manager),
:func:`set_backend`, and the environment variable ``METANET_SCATTER_BACKEND``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

try:  # torch-scatter is optional; everything works without it.
    import torch_scatter  # noqa: F401

    HAS_TORCH_SCATTER = True
except (ImportError, OSError):  # OSError: a build that does not match the installed torch
    torch_scatter = None
    HAS_TORCH_SCATTER = False

BACKENDS = ("auto", "native", "torch_scatter")
ENV_VAR = "METANET_SCATTER_BACKEND"

# Kernel names (implemented in metanet/ops/_kernels.py):
#   "index_add"      native  torch.index_add_                      sum, any index order
#   "spmm"           native  sparse-CSR @ dense (MKL on CPU),       sum, needs CSR ptr
#                            backward is a plain index_select
#   "scatter_reduce" native  scatter_reduce(amax/amin) forward,     max/min
#                            index_select/index_add backward
#   "segment_reduce" native  torch.segment_reduce                   max/min, needs CSR ptr
#   "ts_scatter"     torch_scatter.scatter                          sum/max/min
#   "ts_segment"     torch_scatter.segment_csr                      sum/max/min, needs CSR ptr
#
# AUTO_TABLE[(reduction, layout)] -> kernel. "mean" and "std" reuse the "sum" kernel,
# "min" reuses the "max" kernel. Layout "index" is an arbitrary (unsorted) index, "csr" means
# the caller passed a CSR pointer (edges sorted by destination), "csr_high_degree" a CSR
# pointer with >= 128 rows per segment on average; a "+grad" entry, where present, overrides
# its layout when src requires grad.
# Justified by `python scripts/bench_scatter.py` and `... --backward` (2-core AMD EPYC,
# torch 2.13, torch-scatter 2.1.2): for sum/mean, spmm (with its per-ptr cached matrix) beat
# segment_csr, segment_reduce, index_add and torch_scatter.scatter at 10k-1.9M edges, ~2x at
# 1M forward; for max, scatter_reduce(amax) was ~2x faster than segment_csr forward at mean
# degree <= 128, segment_csr faster above (ResNet-18: ~330 in-edges per node) and for
# forward+backward (argmax backward); torch_scatter.scatter max was ~10x slower than
# scatter_reduce and is never chosen. For unsorted indices index_add and
# torch_scatter.scatter were within noise of each other; native is kept.
AUTO_TABLE: dict[tuple[str, str], str] = {
    ("sum", "index"): "index_add",
    ("sum", "csr"): "spmm",
    ("max", "index"): "scatter_reduce",
    ("max", "csr"): "scatter_reduce",
    ("sum", "csr_high_degree"): "spmm",
    ("max", "csr_high_degree"): "ts_segment",
    # when src requires grad (forward + backward timed with --backward): segment_csr's
    # argmax backward is ~2x faster than any scatter_reduce backward for sorted rows
    ("max", "csr+grad"): "ts_segment",
}

# What the two forced backends use.
NATIVE_TABLE: dict[tuple[str, str], str] = {
    **AUTO_TABLE,
    ("max", "csr_high_degree"): "scatter_reduce",
    ("max", "csr+grad"): "scatter_reduce",
}
TORCH_SCATTER_TABLE: dict[tuple[str, str], str] = {
    ("sum", "index"): "ts_scatter",
    ("sum", "csr"): "ts_segment",
    ("max", "index"): "ts_scatter",
    ("max", "csr"): "ts_segment",
    ("sum", "csr_high_degree"): "ts_segment",
    ("max", "csr_high_degree"): "ts_segment",
}

_state: dict[str, str | None] = {"backend": None, "env": None}


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(
            f"unknown scatter backend {name!r} from {source}; choose one of {BACKENDS}"
        )
    if name == "torch_scatter" and not HAS_TORCH_SCATTER:
        raise ValueError(
            f"scatter backend 'torch_scatter' requested by {source}, but torch_scatter is not "
            "installed (pip install 'metanet[scatter]') or does not import"
        )
    return name


def get_backend() -> str:
    """The active backend name: the last :func:`set_backend`, else the env var, else "auto"."""
    if _state["backend"] is not None:
        return _state["backend"]
    if _state["env"] is None:  # read once (per set_backend(None)): this runs on every call
        env = os.environ.get(ENV_VAR, "").strip()
        _state["env"] = _check_name(env, f"${ENV_VAR}") if env else "auto"
    return _state["env"]


def set_backend(name: str | None) -> None:
    """Select "auto", "native" or "torch_scatter" for all later calls.

    ``None`` goes back to ``$METANET_SCATTER_BACKEND`` (read again) or "auto".
    """
    _state["backend"] = None if name is None else _check_name(name, "set_backend()")
    _state["env"] = None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: ``with use_backend("native"): ...`` restores the previous choice after."""
    previous = _state["backend"]
    _state["backend"] = _check_name(name, "use_backend()")
    try:
        yield
    finally:
        _state["backend"] = previous


def available_backends() -> list[str]:
    """Backends usable on this machine (for tests and benchmarks)."""
    return ["auto", "native"] + (["torch_scatter"] if HAS_TORCH_SCATTER else [])


def kernel_for(reduce: str, layout: str, grad: bool = False) -> str:
    """The kernel name the active backend uses for ``reduce`` ("sum"/"max") on ``layout``."""
    backend = get_backend()
    table = {"auto": AUTO_TABLE, "native": NATIVE_TABLE}.get(backend, TORCH_SCATTER_TABLE)
    kernel = table.get((reduce, layout + "+grad")) if grad else None
    kernel = kernel or table[(reduce, layout)]
    if kernel.startswith("ts_") and not HAS_TORCH_SCATTER:  # "auto" without torch-scatter
        kernel = NATIVE_TABLE[(reduce, layout)]
    return kernel
