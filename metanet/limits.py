"""Memory limits: refuse work that would not fit, with an error, before allocating it.

Every job that can be asked for more memory than the machine has (reading a file, building the
parameter graph of a large network, opening a zoo, sampling networks) estimates what it needs and
calls :func:`check_memory` first, so a request that is too large ends in one line naming the
estimate and the limit instead of a kill by the operating system.

The limit is ``METANET_MEMORY_LIMIT_GB`` when set (a number of GiB, e.g. ``8`` or ``0.5``), else
75% of the machine's physical memory. :func:`memory_limit` overrides it for a block of code.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator
from typing import Any

ENV_VAR = "METANET_MEMORY_LIMIT_GB"
DEFAULT_FRACTION = 0.75
_GIB = 1024**3
_override: list[int] = []


class MemoryLimitError(MemoryError):
    """An estimated allocation exceeds metanet's memory limit (the message names both)."""


def physical_memory_bytes() -> int:
    """Total physical memory of this machine in bytes (``os.sysconf``; 8 GiB when unknown)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 * _GIB


def memory_limit_bytes() -> int:
    """The memory limit in force, in bytes (see the module docstring for where it comes from)."""
    if _override:
        return _override[-1]
    raw = os.environ.get(ENV_VAR)
    if raw:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{ENV_VAR}={raw!r} is not a number of GiB") from None
        if value <= 0:
            raise ValueError(f"{ENV_VAR}={raw!r} must be positive")
        return int(value * _GIB)
    return int(physical_memory_bytes() * DEFAULT_FRACTION)


@contextlib.contextmanager
def memory_limit(limit_bytes: int) -> Iterator[None]:
    """Run a block of code under another memory limit (``limit_bytes``), e.g. in tests."""
    _override.append(int(limit_bytes))
    try:
        yield
    finally:
        _override.pop()


def format_bytes(n: float) -> str:
    """``n`` bytes as a short human-readable size (``1.5 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def itemsize(dtype: Any) -> int:
    """Bytes per element of ``dtype``: a ``torch.dtype``, a numpy dtype (or anything
    ``numpy.dtype`` accepts) or an int (taken as the item size itself)."""
    if isinstance(dtype, int):
        return dtype
    size = getattr(dtype, "itemsize", None)  # torch.dtype (torch >= 2.1) and numpy dtypes
    if isinstance(size, int):
        return size
    import numpy as np

    try:
        return int(np.dtype(dtype).itemsize)
    except TypeError:
        import torch

        if isinstance(dtype, torch.dtype):
            return torch.empty((), dtype=dtype).element_size()
        raise


def tensor_bytes(shape: Iterable[int], dtype: Any) -> int:
    """Bytes of a dense array of ``shape`` and ``dtype`` (exact Python ints: no overflow for
    absurd shapes)."""
    return math.prod(int(s) for s in shape) * itemsize(dtype)


def check_memory(estimate_bytes: float, what: str, limit_bytes: int | None = None) -> None:
    """Raise :class:`MemoryLimitError` when ``what`` is estimated to need more than the limit.

    Args:
        estimate_bytes: the estimated allocation.
        what: what would be allocated, for the message (``"the parameter graph of VGG"``).
        limit_bytes: the limit to check against (default :func:`memory_limit_bytes`).
    """
    limit = memory_limit_bytes() if limit_bytes is None else int(limit_bytes)
    if estimate_bytes > limit:
        raise MemoryLimitError(
            f"{what} needs an estimated {format_bytes(estimate_bytes)}, over metanet's memory "
            f"limit of {format_bytes(limit)} (set {ENV_VAR} to change it)"
        )
